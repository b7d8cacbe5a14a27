"""Export a dist checkpoint (any layout) to one file that loads without Ray or megatron parallel state.

Load it with `mor_dist.inference.generation.load_checkpoint` (or `jobs/generate.py --checkpoint`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing

from mor_dist.config import config_from_dict
from mor_dist.errors import ConfigError
from mor_dist.catalog import verify


def export(checkpoint: Path, out_file: Path) -> dict[str, Any]:
    """Gather the model into a single unsharded state dict: {"config", "vocab_size", "step", "model"}."""
    from mor_dist.model.mor import build_model
    from mor_dist.parallel.setup import init_single_process

    if out_file.is_dir():
        raise ConfigError(f"cannot export: {out_file} is a directory; give the file to write, e.g. {out_file / 'model.pt'}")
    problem = verify(checkpoint)
    if problem is not None:
        raise ConfigError(f"cannot export: {problem}")
    extra = dist_checkpointing.load_common_state_dict(str(checkpoint))["extra"]
    cfg = config_from_dict(extra["config"])
    single = copy.deepcopy(cfg)
    single.parallel.tp = single.parallel.pp = single.parallel.dp = 1
    single.parallel.sequence_parallel = False
    init_single_process()
    model = build_model(single, extra["vocab_size"], on_cuda=False)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
    model.load_state_dict(loaded["model"], strict=False)
    payload = {"config": single.to_dict(), "vocab_size": extra["vocab_size"], "step": extra["step"],
               "model": {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out_file)
    return payload
