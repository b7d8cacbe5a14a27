"""The few shims that let megatron-core 0.16-0.19 run on CPU with gloo (applied only without CUDA)."""

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


_FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full", "empty_like", "zeros_like", "ones_like"})

# megatron modules that create tensors with a hard-coded device="cuda".
_CUDA_HARDCODED = (
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def _on_cpu(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


class _TorchOnCpu(types.ModuleType):
    """`torch` as a megatron module sees it: tensor factories asked for "cuda" build on the CPU."""

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        return _on_cpu(attr) if name in _FACTORIES else attr


@functools.lru_cache(maxsize=8)
def cpu_causal_mask(sq: int) -> torch.Tensor:
    """megatron's default causal mask (True = hidden), built on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def cpu_clip_grad_by_total_norm(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False):
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA-tensor assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def apply_cpu_shims() -> None:
    """Patch megatron-core for CPU; a no-op when CUDA is available or already applied."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    import importlib

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = torch.cpu.current_stream  # megatron 0.19's grad sync asks for it; torch's CPU stream
    torch.Tensor.cuda = lambda self, *a, **k: self  # a CPU-only host: "to the accelerator" stays put
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = cpu_clip_grad_by_total_norm
    optimizer.clip_grad_by_total_norm_fp32 = cpu_clip_grad_by_total_norm
    for name in _CUDA_HARDCODED:
        importlib.import_module(name).torch = _TorchOnCpu("torch")
    fused_softmax.get_default_causal_mask = cpu_causal_mask
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random.initialize_rng_tracker(force_reset=True)
    mp_random.model_parallel_cuda_manual_seed = cpu_model_parallel_seed
    _APPLIED = True
