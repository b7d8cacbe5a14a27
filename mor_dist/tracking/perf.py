"""Model FLOPs utilisation: achieved FLOP/s over this device's dense matmul peak, measured once."""

from __future__ import annotations

import functools
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def peak_flops(on_cuda: bool, precision: str) -> float:
    """Best FLOP/s of a timed large matmul: bf16 on GPUs, the run's dtype on CPUs (cached per process)."""
    if on_cuda:
        device, dtype, n, reps = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 8192, 10
    else:
        device, dtype, n, reps = torch.device("cpu"), torch.float32 if precision == "fp32" else torch.bfloat16, 1024, 2
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up: kernel selection, thread pool start
    _sync(device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2.0 * n**3 / best


def mfu(tflops_per_s: float, world_size: int, on_cuda: bool, precision: str) -> float:
    """Job-wide achieved TFLOP/s as a fraction of world_size devices at their measured peak."""
    return tflops_per_s * 1e12 / (world_size * peak_flops(on_cuda, precision))
