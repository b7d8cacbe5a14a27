"""MLflow tracking: one run per training run, resumed after restarts, metrics with explicit steps."""
