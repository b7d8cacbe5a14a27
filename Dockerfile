# mor-dist image for the KubeRay manifests in k8s/: CUDA PyTorch, Ray, megatron-core, Transformer Engine,
# and this repository (jobs/, configs/, mor_dist/) at /workspace/mor-dist, the Ray containers' workingDir.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t registry.example.com/ml/mor-dist:0.1.0-ray2.60.0 .
#   docker push registry.example.com/ml/mor-dist:0.1.0-ray2.60.0
#
# The tag's "-ray<version>" must equal RAY_VERSION here and rayVersion in k8s/base (tests/test_k8s.py checks
# both against the installed Ray). Point the manifests at the pushed name with kustomize `images:`
# (docs/kubernetes.md).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
# Transformer Engine: core wheel for the base image's CUDA major, torch extension compiled for these GPUs
# (8.0 A100, 9.0 H100/H200; add 10.0 for B200).
ARG TE_CORE=core_cu12
ARG NVTE_CUDA_ARCHS="80;90"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS} MAX_JOBS=16

# wget: KubeRay's default readiness and liveness probes run it inside the Ray containers.
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*

# Slow, rarely changing layer: Ray and Transformer Engine (built against the image's torch, so no isolation).
RUN pip install "ray[default,train]==${RAY_VERSION}" ninja pybind11 && \
    pip install --no-build-isolation "transformer-engine[${TE_CORE},pytorch]>=2.6"

WORKDIR /workspace/mor-dist
COPY . .
# .git stays out of the image (.dockerignore): the commit is recorded here, and MLflow runs show it.
ARG GIT_COMMIT=unknown
ENV MOR_DIST_GIT_COMMIT=${GIT_COMMIT}
# Editable, so that mor_dist's REPO_ROOT is this directory (configs/, k8s/) in every Ray process.
# The extra that matches TE_CORE, so pip keeps the Transformer Engine core built above.
RUN extra=$([ "${TE_CORE}" = core_cu13 ] && echo gpu-cu13 || echo gpu) && \
    pip install "ray[default,train]==${RAY_VERSION}" -e ".[${extra}]" && \
    python -c "import ray, mor_dist.config; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
# Not root: uid 1000 (the manifests' runAsUser), with a home for the caches (~/.cache/mor_dist, Hugging Face).
RUN (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home --shell /bin/bash ray) && \
    mkdir -p /home/ray && chown -R 1000:1000 /workspace/mor-dist /home/ray
ENV HOME=/home/ray
USER 1000
