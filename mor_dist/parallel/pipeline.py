"""Recursion-interleaved pipeline: the shared block split across stages, one virtual chunk per recursion.

Stage p holds layers `block[p*B/PP:(p+1)*B/PP]` of the shared block; recursion r on stage p is
virtual stage `r*PP + p`, so megatron's interleaved schedule runs the recursions as model chunks
over the same weights. Stage 0 also holds the embedding, the first layer and the routers; the last
stage the last layer, the final norm and the head. Vanilla and sequence layouts split their
unrolled layers contiguously, one chunk per stage.

Between stages a MoR chunk sends one fixed-shape message (capacities are static): the residual
stream h [s], the current recursion's tokens scattered to full length [s], and a few rows of
per-token metadata (gate, selection mask, depth), so every message has the same size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mor_dist.config import ConfigError, RunConfig
from mor_dist.model.sharing import LayerPlan


@dataclass(frozen=True)
class VirtualStage:
    """What one model chunk does."""

    index: int  # virtual stage number
    recursion: Optional[int]  # None for vanilla / sequence layouts
    first: bool  # embedding (+ prefix layers of cycle layouts)
    route: bool  # a recursion starts here (routing on stage 0)
    layers: tuple[int, ...]  # unique slots this chunk runs
    merge: bool  # a recursion ends here (results return to the residual stream)
    last: bool  # suffix layers, final norm, head


def is_cyclic(plan: LayerPlan) -> bool:
    """Cycle layouts loop the block as a whole; those are the ones with recursion chunks."""
    return plan.sharing in ("cycle", "middle_cycle")


def _split(items: tuple[int, ...], parts: int, what: str) -> list[tuple[int, ...]]:
    if len(items) % parts:
        raise ConfigError(f"{what} has {len(items)} layers, not divisible by parallel.pp={parts}; "
                          f"change model.num_layers or parallel.pp")
    n = len(items) // parts
    return [items[i * n:(i + 1) * n] for i in range(parts)]


def stage_chunks(plan: LayerPlan, rank: int, size: int) -> list[VirtualStage]:
    """The chunks pipeline stage `rank` of `size` runs, in virtual-stage order."""
    if is_cyclic(plan):
        part = _split(plan.block, size, "the shared block")[rank]
        n = plan.num_recursions
        return [VirtualStage(r * size + rank, r, r == 0 and rank == 0, rank == 0, part, rank == size - 1,
                             r == n - 1 and rank == size - 1) for r in range(n)]
    # Contiguous split that keeps every repeat of a slot on one stage.
    unique = tuple(dict.fromkeys(plan.unrolled))
    mine = set(_split(unique, size, "the model")[rank])
    layers = tuple(s for s in plan.unrolled if s in mine)
    return [VirtualStage(rank, None, rank == 0, False, layers, False, rank == size - 1)]


def stage_slots(plan: LayerPlan, rank: int, size: int) -> tuple[int, ...]:
    """Unique layer slots whose weights live on this stage."""
    slots: list[int] = []
    for chunk in stage_chunks(plan, rank, size):
        if chunk.first and is_cyclic(plan):
            slots += plan.prefix
        slots += chunk.layers
        if chunk.last and is_cyclic(plan):
            slots += plan.suffix
    return tuple(dict.fromkeys(slots))


def virtual_size(cfg: RunConfig, plan: LayerPlan) -> Optional[int]:
    """megatron's virtual_pipeline_model_parallel_size: N_r chunks per stage for cycle layouts under PP."""
    if cfg.parallel.pp > 1 and is_cyclic(plan):
        return plan.num_recursions
    return None


def meta_rows(cfg: RunConfig) -> int:
    """Rows of per-token metadata in a MoR message (gate, mask, depth: 3 values per token)."""
    m = cfg.model
    rows = -(-3 * m.seq_length // m.hidden_size)
    tp = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    return -(-(2 * m.seq_length + rows) // tp) * tp - 2 * m.seq_length


def message_rows(cfg: RunConfig, routed: bool) -> int:
    """Sequence length of one stage-to-stage message (what the schedule's tensor shape uses)."""
    return 2 * cfg.model.seq_length + meta_rows(cfg) if routed else cfg.model.seq_length


def pack_meta(values: list[torch.Tensor], rows: int, hidden: int) -> torch.Tensor:
    """[b, s] tensors -> [rows, b, hidden] (gradients kept)."""
    b = values[0].shape[0]
    flat = torch.cat([v.to(torch.float32) for v in values], dim=1)
    flat = torch.nn.functional.pad(flat, (0, rows * hidden - flat.shape[1]))
    return flat.view(b, rows, hidden).transpose(0, 1)


def unpack_meta(meta: torch.Tensor, count: int, seq: int) -> list[torch.Tensor]:
    """Inverse of pack_meta: [rows, b, hidden] -> `count` tensors [b, s]."""
    flat = meta.transpose(0, 1).reshape(meta.shape[1], -1).float()
    return [flat[:, i * seq:(i + 1) * seq] for i in range(count)]


class PipelineChunk(torch.nn.Module):
    """One virtual stage as megatron's schedules see a model chunk; the weights stay in the stage's DDP."""

    def __init__(self, stage: torch.nn.Module, vs: VirtualStage) -> None:
        super().__init__()
        self._stage = (stage,)  # a tuple: not a registered submodule, so no parameter is seen twice
        self.vs = vs
        self.input_tensor: Optional[torch.Tensor] = None

    @property
    def module(self) -> torch.nn.Module:
        """The stage's MoRModel (what megatron's attribute lookups unwrap to)."""
        return getattr(self._stage[0], "module", self._stage[0])

    @property
    def config(self):
        return self.module.config

    @property
    def model_type(self):
        return self.module.model_type

    def train(self, mode: bool = True) -> "PipelineChunk":
        self._stage[0].train(mode)
        return super().train(mode)

    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        model = self.module
        model.router_stats, model.token_depths = {}, None
        causal = not model.training and model.cfg.routing.inference_rule == "threshold"
        carry = None if self.vs.first else model.unpack(self.input_tensor, self.vs)
        out = model.forward_chunk(self.vs, carry, input_ids, labels, causal)
        return out if self.vs.last else model.pack(out)


class ChunkBatches:
    """Hands every chunk of a stage the same micro-batches while reading the data iterator once."""

    def __init__(self, source, num_chunks: int) -> None:
        self.source, self.seen, self.cursor = source, [], [0] * num_chunks

    def iterator(self, chunk: int):
        while True:
            if self.cursor[chunk] == len(self.seen):
                self.seen.append(next(self.source))
            self.cursor[chunk] += 1
            yield self.seen[self.cursor[chunk] - 1]
