"""Few-shot evaluation through lm-evaluation-harness: mor-dist models as an lm-eval model class, results in MLflow."""
