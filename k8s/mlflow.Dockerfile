# The MLflow server image for k8s/overlays/mlflow-postgres: the official image plus the PostgreSQL driver, the
# S3 client its backend and artifact stores need, and the login app's extra (`mlflow[auth]`: Flask-WTF), none
# of which the official image has; run as uid 1000.
#
#   docker build -f k8s/mlflow.Dockerfile -t registry.example.com/ml/mor-mlflow:3.17.2 k8s
ARG MLFLOW_VERSION=v3.17.2
FROM ghcr.io/mlflow/mlflow:${MLFLOW_VERSION}
ARG MLFLOW_VERSION
RUN pip install --no-cache-dir "psycopg2-binary>=2.9" "boto3>=1.34" "mlflow[auth]==${MLFLOW_VERSION#v}"
USER 1000
