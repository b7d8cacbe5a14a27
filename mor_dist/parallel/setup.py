"""megatron parallel_state over the process group Ray Train (or a test) created; per-rank seeds."""

from __future__ import annotations

import gc
import os
import random

import torch
import torch.distributed as dist

from mor_dist.config import ParallelConfig
from mor_dist.parallel.cpu_compat import apply_cpu_shims


def init_single_process(port: int | None = None) -> None:
    """A world of one (tests, dry runs, export): gloo on loopback."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if port is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def init_model_parallel(parallel: ParallelConfig, seed: int, virtual_size: int | None = None) -> None:
    """initialize_model_parallel over the existing default group, then seed as megatron does."""
    from megatron.core import parallel_state

    apply_cpu_shims()
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before init_model_parallel")
    world = dist.get_world_size()
    expected = parallel.tp * parallel.pp * parallel.dp
    if world != expected:
        raise RuntimeError(f"world size {world} != parallel.tp*pp*dp = {expected}")
    destroy_parallel_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=virtual_size,
        create_gloo_process_groups=not torch.cuda.is_available(),
    )
    seed_all(seed)


def seed_all(seed: int) -> None:
    """Python, torch and megatron's model-parallel RNG streams; pipeline stages get distinct seeds."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    mp_random.model_parallel_cuda_manual_seed(seed)


def destroy_parallel_groups() -> None:
    """Destroy megatron's process groups, keeping the default one. megatron's own destroy only forgets them,
    and every forgotten gloo group keeps its threads: a process that re-initialises would pile them up."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        # torch lists a process's groups nowhere public; this map is what destroy_process_group itself uses.
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not dist.GroupMember.WORLD:
                dist.destroy_process_group(group)
    gc.collect()  # a finished model holding the old groups often sits in reference cycles; free it now


def teardown() -> None:
    """Destroy megatron groups and the default process group (tests, benchmarks)."""
    destroy_parallel_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
