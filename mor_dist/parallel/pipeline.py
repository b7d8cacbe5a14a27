"""The recursion-interleaved pipeline as megatron's schedules see it: one module per virtual chunk, all
views over the stage's single DDP (the plan of chunks is `layout`'s)."""

from __future__ import annotations

from typing import Optional

import torch

from mor_dist.layout import ChunkPlan


class PipelineChunk(torch.nn.Module):
    """One virtual stage as megatron's schedules see a model chunk; the weights stay in the stage's DDP."""

    def __init__(self, ddp: torch.nn.Module, plan: ChunkPlan) -> None:
        super().__init__()
        self._ddp = (ddp,)  # a tuple: not a registered submodule, so no parameter is seen twice
        self.plan = plan
        self.input_tensor: Optional[torch.Tensor] = None

    @property
    def module(self) -> torch.nn.Module:
        """The stage's MoRModel (what megatron's attribute lookups unwrap to)."""
        return getattr(self._ddp[0], "module", self._ddp[0])

    @property
    def config(self):
        return self.module.config

    @property
    def model_type(self):
        return self.module.model_type

    def train(self, mode: bool = True) -> "PipelineChunk":
        self._ddp[0].train(mode)
        return super().train(mode)

    def set_input_tensor(self, input_tensor) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        return self.module.run_chunk(self.plan, self.input_tensor, input_ids, labels)


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
