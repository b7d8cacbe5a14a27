"""Training benchmarks and GPU checks in one process, without Ray or MLflow (GPU hosts may lack both)."""
