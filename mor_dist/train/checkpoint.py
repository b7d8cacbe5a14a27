"""megatron dist_checkpointing for model and optimizer (reshardable), plus loop state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing

from mor_dist.train.step import unwrap

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}  # allows TP/PP changes on load


def _state(chunks, optimizer, scheduler, extra: dict[str, Any], loading: bool) -> dict[str, Any]:
    model_sd = unwrap(chunks[0]).sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=OPTIMIZER_SHARDING),
        "scheduler": scheduler.state_dict(),
        "extra": extra,
    }


def save_checkpoint(directory: Path, chunks, optimizer, scheduler, extra: dict[str, Any]) -> None:
    """Every rank writes its shards into `directory` (rank 0 adds the common state)."""
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_state(chunks, optimizer, scheduler, extra, loading=False), str(directory))


def load_checkpoint(directory: Path, chunks, optimizer, scheduler) -> dict[str, Any]:
    """Load into the live model/optimizer/scheduler (any TP/PP layout); returns the extra state."""
    template = _state(chunks, optimizer, scheduler, {}, loading=True)
    del template["extra"], template["scheduler"]
    loaded = dist_checkpointing.load(template, str(directory))
    unwrap(chunks[0]).load_state_dict(loaded["model"], strict=False)
    optimizer.load_state_dict(loaded["optimizer"])
    common = dist_checkpointing.load_common_state_dict(str(directory))
    scheduler.load_state_dict(common["scheduler"])
    return common["extra"]
