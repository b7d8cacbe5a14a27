"""The MoR model: sharing layouts, routers, layer specs, FLOPs (no Ray or MLflow imports here)."""
