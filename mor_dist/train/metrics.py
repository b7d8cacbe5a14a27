"""Reduce per-rank scalars (loss on the last stage, router stats on the router's stage) to every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_means(local: dict[str, float], keys: list[str]) -> dict[str, float]:
    """Mean of each key over the ranks that hold it; every rank gets the same dict (one all-reduce).

    `keys` must be the same list on every rank; a rank contributes only the keys it has.
    """
    values = torch.zeros(2 * len(keys), dtype=torch.float64)
    for i, key in enumerate(keys):
        if key in local:
            values[2 * i], values[2 * i + 1] = float(local[key]), 1.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu()
    return {key: float(values[2 * i] / values[2 * i + 1]) for i, key in enumerate(keys) if values[2 * i + 1] > 0}
