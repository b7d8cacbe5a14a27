"""A single-process training harness: the real DDP, optimizer and train_step, timed, on synthetic or corpus rows."""

from __future__ import annotations

import gc
import itertools
import resource
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from mor_dist.config import JobConfig
from mor_dist.parallel.setup import init_single_process, teardown
from mor_dist.train.step import train_step
from mor_dist.train.trainable import Trainable

Batch = dict[str, torch.Tensor]


def init_world(on_cuda: bool) -> None:
    """A world of one: NCCL on CUDA (the distributed optimizer reduce-scatters), gloo on CPU."""
    backend = "nccl" if on_cuda else "gloo"
    if dist.is_initialized():
        if dist.get_backend() == backend:
            return
        teardown()
    if not on_cuda:
        init_single_process()
        return
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)


def rows_to_batch(rows: torch.Tensor) -> Batch:
    """Rows of seq_length + 1 token ids -> tokens, labels (shifted by one) and a full loss mask."""
    rows = rows.long()
    tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(labels.shape, device=rows.device)}


def synthetic_batches(cfg: JobConfig, vocab: int, device: torch.device, count: int = 4) -> Iterator[Batch]:
    """Endless uniform-random micro-batches (a fixed few, cycled), already on the device."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    shape = (cfg.train.micro_batch_size, cfg.model.seq_length + 1)
    return itertools.cycle([rows_to_batch(torch.randint(0, vocab, shape, generator=gen).to(device))
                            for _ in range(count)])


def corpus_batches(rows: np.ndarray, micro_batch: int, seed: int, device: torch.device) -> Iterator[Batch]:
    """Endless micro-batches of packed corpus rows, reshuffled each epoch with a fixed seed."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order) - micro_batch + 1, micro_batch):
            chunk = np.sort(order[start:start + micro_batch])
            yield rows_to_batch(torch.from_numpy(np.asarray(rows[chunk], dtype=np.int64)).to(device))


@dataclass(frozen=True)
class Timing:
    """Throughput of the timed steps and the peak memory since the model was built."""

    tokens_per_s: float
    step_s: float
    peak_mem_gib: float


def _sync(on_cuda: bool) -> None:
    if on_cuda:
        torch.cuda.synchronize()


def reset_memory(on_cuda: bool) -> int:
    """Free what earlier models left, restart the peak counter; bytes still allocated (CUDA; CPU: 0)."""
    gc.collect()
    fp8 = sys.modules.get("transformer_engine.pytorch.fp8")
    if fp8 is not None:
        fp8.FP8GlobalStateManager.reset()  # delayed scaling's global amax buffers
    if not on_cuda:
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_memory_gib(on_cuda: bool, start_bytes: int = 0) -> float:
    """Peak allocated device memory above `start_bytes` since reset_memory (CUDA), or the process's peak RSS (CPU)."""
    if on_cuda:
        return (torch.cuda.max_memory_allocated() - start_bytes) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_steps(run: Trainable, batches: Iterator[Batch], warmup: int, steps: int, on_cuda: bool,
                start_bytes: int = 0) -> Timing:
    """`warmup` untimed steps, then `steps` timed ones; memory counted above `start_bytes` (reset_memory's)."""
    for _ in range(warmup):
        train_step(run, batches)
    _sync(on_cuda)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(run, batches)
    _sync(on_cuda)
    elapsed = time.perf_counter() - start
    t = run.cfg.train
    tokens = steps * t.global_batch_size * run.cfg.model.seq_length
    return Timing(tokens / elapsed, elapsed / steps, peak_memory_gib(on_cuda, start_bytes))
