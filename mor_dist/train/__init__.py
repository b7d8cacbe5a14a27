"""Training: optimizer and schedule, the megatron step, metrics, checkpoints, the worker loop."""
