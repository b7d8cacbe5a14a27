"""mor-dist: distributed Mixture-of-Recursions training on Ray Train and megatron-core."""

__version__ = "0.1.0"
