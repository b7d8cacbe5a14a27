"""Which pretrained layers fill each slot of a recursive model: the Relaxed Recursive Transformers strategies
(Bae et al., 2024) as the official MoR code applies them (docs/uptraining.md).

A source of S layers first becomes the model's effective depth L <= S by keeping evenly spaced layers
(middle layouts keep the first and last). Unique first/last slots copy the kept first/last layers; the
B shared-block slots take, for slot i:
- stepwise: kept[round(linspace(1, L-2, B))[i]] (middle layouts) or kept[round(linspace(0, L-1, B))[i]];
- lower / upper: the first / last B kept layers (inside the first and last for middle layouts);
- average: the mean of the kept layers the slot replaces in the unrolled model;
- random: a sorted random choice of B kept layers (seeded).
A vanilla model's slots are the source's layers in order, whatever the strategy.
"""

from __future__ import annotations

import random

import numpy as np

from mor_dist.layout import LayerPlan

STRATEGIES = ("stepwise", "lower", "upper", "average", "random")


def kept_layers(source_layers: int, depth: int, middle: bool) -> list[int]:
    """`depth` evenly spaced source layers (the first and last among them for middle layouts)."""
    if depth == source_layers:
        return list(range(source_layers))
    if middle:
        inner = np.round(np.linspace(1, source_layers - 2, depth - 2)).astype(int).tolist()
        return [0, *inner, source_layers - 1]
    return np.round(np.linspace(0, source_layers - 1, depth)).astype(int).tolist()


def slot_sources(plan: LayerPlan, source_layers: int, strategy: str, seed: int = 0) -> dict[int, list[int]]:
    """{slot: the source layers whose weights (averaged when several) initialise it}."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown init strategy {strategy!r}; choose one of {STRATEGIES}")
    depth = len(plan.unrolled)
    middle = plan.sharing.startswith("middle_")
    kept = kept_layers(source_layers, depth, middle)
    positions: dict[int, list[int]] = {}
    for position, slot in enumerate(plan.unrolled):
        positions.setdefault(slot, []).append(position)
    out = {slot: [kept[p[0]]] for slot, p in positions.items()}  # unique slots run at one depth
    shared = [slot for slot in dict.fromkeys(plan.unrolled) if len(positions[slot]) > 1]
    if not shared:
        return out
    b, lo, hi = len(shared), (1 if middle else 0), depth - (1 if middle else 0)  # candidates: kept[lo:hi]
    if strategy == "average":
        picks = [[kept[p] for p in positions[slot]] for slot in shared]
    elif strategy == "stepwise":
        picks = [[kept[i]] for i in np.round(np.linspace(lo, hi - 1, b)).astype(int).tolist()]
    elif strategy == "lower":
        picks = [[kept[lo + i]] for i in range(b)]
    elif strategy == "upper":
        picks = [[kept[hi - b + i]] for i in range(b)]
    else:
        picks = [[kept[i]] for i in sorted(random.Random(seed).sample(range(lo, hi), b))]
    out.update(zip(shared, picks))
    return out


def describe(sources: dict[int, list[int]]) -> str:
    """'slot <- source layers' in slot order, e.g. '0<-0 1<-1 2<-3 ... 15<-29' (averages as 1+15)."""
    return " ".join(f"{slot}<-{'+'.join(map(str, layers))}" for slot, layers in sorted(sources.items()))
