"""megatron dist_checkpointing for model and optimizer (reshardable across TP/PP), plus loop state.

Every rank writes its shards and then a manifest of what it wrote (`catalog`); loading trusts a
checkpoint that the driver or rank 0 already verified once, so no rank re-reads every byte.
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from mor_dist.catalog import file_entries, write_manifest
from mor_dist.train.trainable import Trainable

NEARLY_FULL_BYTES = 16 * 2**20
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}  # allows TP/PP changes on load


class StorageFull(OSError):
    """No space left where a checkpoint is written; the message names the path and what to do."""


def layout() -> list[int]:
    """(tp, pp, dp) of the running job."""
    return [parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size()]


def _rng_object(saved_layout: list[int]) -> ShardedObject:
    """This rank's RNG states, addressed by its (pp, tp, dp) coordinates."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tp, pp, dp = saved_layout
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    coords = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
              parallel_state.get_data_parallel_rank())
    return ShardedObject("rng_state", state, (pp, tp, dp), coords, replica_id=0)


def _data_object(state: Any, dp_size: int, dp_rank: int, replica: Optional[int] = None) -> ShardedObject:
    """The data position, one per data-parallel rank (TP/PP peers hold copies; `replica` default: the rank's
    place among them)."""
    if replica is None:
        replica = parallel_state.get_tensor_model_parallel_rank() + \
            parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_rank()
    return ShardedObject("data_position", state, (dp_size,), (dp_rank,), replica_id=replica)


def is_disk_full(err: BaseException) -> bool:
    """Whether an error, or one it wraps, is a full disk. torch's distributed checkpoint collects each rank's
    failure in `failures`, and megatron's writer processes pass theirs on as text ("[Errno 28] ...")."""
    pending: list[Any] = [err]
    while pending:
        item = pending.pop()
        if item is None:
            continue
        if isinstance(item, OSError) and item.errno == errno.ENOSPC or f"[Errno {errno.ENOSPC}]" in str(item):
            return True
        if isinstance(item, BaseException):
            pending += [item.__cause__, item.__context__, *dict(getattr(item, "failures", None) or {}).values()]
    return False


def nearly_full(where: Path) -> bool:
    """Whether the device holding `where` has (almost) no room left: torch's writers report a full disk in
    their own words (e.g. "unexpected pos 704 vs 598"), so a failed write is judged by the room left too."""
    existing = next(p for p in (where, *where.parents) if p.exists())
    return shutil.disk_usage(existing).free < NEARLY_FULL_BYTES


def storage_full(where: Path, step: int) -> StorageFull:
    """The error for a checkpoint that did not fit on the device holding `where`."""
    free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free / 2**30
    return StorageFull(errno.ENOSPC, f"no space left on the device holding {where} ({free:.2f} GiB free) while "
                       f"writing the checkpoint of step {step}; free space there, or lower run.keep_checkpoints, "
                       "then run the same command again to resume")


def save_checkpoint(directory: Path, run: Trainable, extra: dict[str, Any], data_state: Any) -> None:
    """Every rank writes its shards into `directory`, then its manifest (the last file it writes).

    A full disk removes this rank's partial files (so a retry has the room again) and raises StorageFull.
    """
    directory.mkdir(parents=True, exist_ok=True)
    before = {str(p.relative_to(directory)) for p in directory.rglob("*")}
    try:
        _write(directory, before, run, extra, data_state)
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        if not (is_disk_full(err) or nearly_full(directory)):
            raise
        if not before:
            shutil.rmtree(directory, ignore_errors=True)
        raise storage_full(directory, extra["step"]) from err


def _write(directory: Path, before: set[str], run: Trainable, extra: dict[str, Any], data_state: Any) -> None:
    model_sd = run.model.sharded_state_dict()
    saved = {**extra, "layout": layout(), "world_size": dist.get_world_size()}
    state = {
        "model": model_sd,
        "optimizer": run.optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIMIZER_SHARDING),
        "rng": _rng_object(saved["layout"]),
        "data": _data_object(data_state, parallel_state.get_data_parallel_world_size(),
                             parallel_state.get_data_parallel_rank()),
        "scheduler": run.scheduler.state_dict(),
        "extra": saved,
    }
    dist_checkpointing.save(state, str(directory))
    dist.barrier()
    rank = dist.get_rank()
    manifest = {"rank": rank, "world_size": saved["world_size"], "step": extra["step"], "saved_at": time.time(),
                "launch": extra.get("launch"), "run_id": extra.get("run_id"), "config": extra.get("config"),
                "vocab_size": extra.get("vocab_size"), "files": file_entries(directory, before)}
    write_manifest(directory, rank, manifest)


def load_checkpoint(directory: Path, run: Trainable) -> tuple[dict[str, Any], Any]:
    """Load a verified checkpoint into the live model/optimizer/scheduler (any TP/PP/DP layout); returns
    (loop state, data position).

    With another data-parallel size the position of data-parallel rank 0 is used: packed data keeps
    one global position, which any DP size can continue from.
    """
    common = dist_checkpointing.load_common_state_dict(str(directory))
    model_sd = run.model.sharded_state_dict()
    template = {"model": model_sd,
                "optimizer": run.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_SHARDING)}
    saved_layout = common["extra"]["layout"]
    same_layout = saved_layout == layout()
    if saved_layout[2] == layout()[2]:
        template["data"] = _data_object(None, saved_layout[2], parallel_state.get_data_parallel_rank())
    else:  # every rank reads data-parallel rank 0's position; each is its own replica of it
        template["data"] = _data_object(None, saved_layout[2], 0, replica=dist.get_rank())
    if same_layout:  # RNG streams belong to ranks; after resharding they restart from the seed
        template["rng"] = _rng_object(layout())
    loaded = dist_checkpointing.load(template, str(directory))
    run.model.load_state_dict(loaded["model"], strict=False)
    run.optimizer.load_state_dict(loaded["optimizer"])
    run.scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        rng = loaded["rng"]
        torch.set_rng_state(rng["torch"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return common["extra"], loaded["data"]
