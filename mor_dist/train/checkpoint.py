"""megatron dist_checkpointing for model and optimizer (reshardable across TP/PP), plus loop state.

Every rank writes its shards and then a manifest of what it wrote (sizes and CRC32s). A checkpoint
counts only when the manifests of all its ranks are present and every listed file matches, so a
partially written, truncated or corrupted checkpoint is never resumed from.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from mor_dist.config import ConfigError

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}  # allows TP/PP changes on load
MANIFEST = "manifest.rank{}.json"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


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


def _data_object(state: Any, dp_size: int, dp_rank: int) -> ShardedObject:
    """The data position, one per data-parallel rank (TP/PP peers hold copies)."""
    replica = parallel_state.get_tensor_model_parallel_rank() + \
        parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_rank()
    return ShardedObject("data_position", state, (dp_size,), (dp_rank,), replica_id=replica)


def _file_entries(directory: Path, before: set[str]) -> dict[str, list[int]]:
    entries = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_file() and rel not in before and not rel.startswith("manifest."):
            data = path.read_bytes()
            entries[rel] = [len(data), zlib.crc32(data)]
    return entries


def save_checkpoint(directory: Path, ddp: torch.nn.Module, optimizer, scheduler, extra: dict[str, Any],
                    data_state: Any) -> None:
    """Every rank writes its shards into `directory`, then its manifest (the last file it writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    before = {str(p.relative_to(directory)) for p in directory.rglob("*")}
    model_sd = _unwrap(ddp).sharded_state_dict()
    saved = {**extra, "layout": layout(), "world_size": dist.get_world_size()}
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIMIZER_SHARDING),
        "rng": _rng_object(saved["layout"]),
        "data": _data_object(data_state, parallel_state.get_data_parallel_world_size(),
                             parallel_state.get_data_parallel_rank()),
        "scheduler": scheduler.state_dict(),
        "extra": saved,
    }
    dist_checkpointing.save(state, str(directory))
    dist.barrier()
    rank = dist.get_rank()
    manifest = {"rank": rank, "world_size": saved["world_size"], "step": extra["step"],
                "run_id": extra.get("run_id"), "config": extra.get("config"), "vocab_size": extra.get("vocab_size"),
                "files": _file_entries(directory, before)}
    (directory / MANIFEST.format(rank)).write_text(json.dumps(manifest))


def verify(directory: Path) -> Optional[str]:
    """None when the checkpoint is whole, else why not (the first problem found)."""
    if not directory.is_dir():
        return f"{directory} is not a checkpoint directory (runs/<name>/checkpoint_<date>_<time>/)"
    first = directory / MANIFEST.format(0)
    if not first.is_file() and (inside := latest_valid(directory, warn=lambda _: None)) is not None:
        return f"{directory} is a run directory, not a checkpoint; its newest checkpoint is {inside}"
    if not first.is_file():
        return f"{directory} has no {first.name}: it was not completely written"
    try:
        world = json.loads(first.read_text())["world_size"]
        manifests = [directory / MANIFEST.format(rank) for rank in range(world)]
        for rank, path in enumerate(manifests):
            if not path.is_file():
                return f"{directory} lacks {path.name}: rank {rank} did not finish writing"
        for path in manifests:
            for rel, (size, crc) in json.loads(path.read_text())["files"].items():
                file = directory / rel
                if not file.is_file():
                    return f"{directory}: {rel} is missing"
                data = file.read_bytes()
                if len(data) != size:
                    return f"{directory}: {rel} is truncated ({len(data)} of {size} bytes)"
                if zlib.crc32(data) != crc:
                    return f"{directory}: {rel} is corrupted (checksum mismatch)"
    except (OSError, ValueError, KeyError) as err:
        return f"{directory}: unreadable manifest ({err})"
    return None


def manifest(directory: Path) -> dict[str, Any]:
    """Rank 0's manifest: step, world size, MLflow run id (None without tracking), run config, padded vocabulary,
    file checksums."""
    return json.loads((directory / MANIFEST.format(0)).read_text())


def checkpoint_step(directory: Path) -> int:
    return manifest(directory)["step"]


def latest_valid(run_dir: Path, warn=print) -> Optional[Path]:
    """The newest whole checkpoint under a run directory; damaged ones are reported and skipped."""
    candidates = [d for d in run_dir.glob("checkpoint_*") if d.is_dir()] if run_dir.is_dir() else []
    scored = []
    for directory in candidates:
        problem = verify(directory)
        if problem is None:
            scored.append((checkpoint_step(directory), directory.name, directory))
        elif (directory / MANIFEST.format(0)).is_file() or any(directory.iterdir()):
            warn(f"warning: skipping checkpoint: {problem}")
    return max(scored)[2] if scored else None


def load_checkpoint(directory: Path, ddp: torch.nn.Module, optimizer, scheduler) -> tuple[dict[str, Any], Any]:
    """Load into the live model/optimizer/scheduler (any TP/PP/DP layout); returns (loop state, data position).

    With another data-parallel size the position of data-parallel rank 0 is used: packed data keeps
    one global position, which any DP size can continue from.
    """
    problem = verify(directory)
    if problem is not None:
        raise ConfigError(f"cannot resume: {problem}; pick another with --resume-from")
    common = dist_checkpointing.load_common_state_dict(str(directory))
    model_sd = _unwrap(ddp).sharded_state_dict()
    template = {"model": model_sd,
                "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_SHARDING)}
    saved_layout = common["extra"]["layout"]
    same_layout = saved_layout == layout()
    dp_rank = parallel_state.get_data_parallel_rank() if saved_layout[2] == layout()[2] else 0
    template["data"] = _data_object(None, saved_layout[2], dp_rank)
    if same_layout:  # RNG streams belong to ranks; after resharding they restart from the seed
        template["rng"] = _rng_object(layout())
    loaded = dist_checkpointing.load(template, str(directory))
    _unwrap(ddp).load_state_dict(loaded["model"], strict=False)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        rng = loaded["rng"]
        torch.set_rng_state(rng["torch"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return common["extra"], loaded["data"]
