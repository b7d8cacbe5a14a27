"""megatron parallel state, CPU shims and the recursion-following pipeline."""
