"""The few shims that let megatron-core 0.16+ run on CPU with gloo (applied only without CUDA)."""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """megatron's CUDA RNG tracker, keeping named CPU generator states instead."""

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"rng state {name} / seed {seed} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def cpu_model_parallel_seed(seed: int, *args, **kwargs) -> None:
    """CPU stand-in for tensor_parallel.model_parallel_cuda_manual_seed (same seed offsets)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + 100 + tp_rank)


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by the pipeline schedules: tensors asked for on "cuda" land on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


@functools.lru_cache(maxsize=8)
def cpu_causal_mask(sq: int) -> torch.Tensor:
    """megatron's default causal mask (True = hidden), built on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def apply_cpu_shims() -> None:
    """Patch megatron-core for CPU; a no-op when CUDA is available or already applied."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    schedules.torch = _TorchOnCpu("torch")
    fused_softmax.get_default_causal_mask = cpu_causal_mask
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random.initialize_rng_tracker(force_reset=True)
    mp_random.model_parallel_cuda_manual_seed = cpu_model_parallel_seed
    _APPLIED = True
