"""One builder for a rank's trainable stage: parallel state, model, megatron DDP, optimizer and schedule,
the grad hooks, and the chunks megatron's schedules run. The training loop, the benchmarks and the
tests all start here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

from mor_dist.config import JobConfig
from mor_dist.layout import Layout
from mor_dist.model.from_pretrained import load_pretrained
from mor_dist.model.mor import build_model
from mor_dist.parallel.pipeline import ChunkBatches, PipelineChunk
from mor_dist.train.optim import build_optimizer, wrap_ddp


@dataclass
class Trainable:
    """This rank's part of the model, ready to train."""

    cfg: JobConfig
    layout: Layout
    ddp: DistributedDataParallel  # holds the stage's weights once, whatever the number of chunks
    chunks: list[torch.nn.Module]  # what the schedule runs: the DDP itself, or one PipelineChunk per virtual stage
    optimizer: Any
    scheduler: Any

    @property
    def model(self) -> torch.nn.Module:
        """The model inside the DDP wrapper."""
        return self.ddp.module

    @classmethod
    def build(cls, cfg: JobConfig, vocab_size: int, on_cuda: bool, pretrained: bool = False) -> "Trainable":
        """Parallel state and this rank's MoRModel for `cfg`, made trainable; `pretrained`: with model.init_from's
        weights (before the optimizer copies them)."""
        model = build_model(cfg, vocab_size, on_cuda)
        if pretrained and cfg.model.init_from:
            load_pretrained(model, cfg)
        return cls.around(cfg, model, on_cuda)

    @classmethod
    def around(cls, cfg: JobConfig, model: torch.nn.Module, on_cuda: bool) -> "Trainable":
        """Make a model built on this rank trainable (megatron's GPTModel too, for the baseline)."""
        layout = cfg.layout
        ddp = wrap_ddp(cfg, model, on_cuda)
        optimizer, scheduler = build_optimizer(cfg, [ddp], on_cuda)
        # One DDP holds the stage's weights; its chunks share them, so grads are finalised once.
        model.config.finalize_model_grads_func = lambda _chunks, num_tokens=None, **kw: finalize_model_grads(
            [ddp], num_tokens, **kw)
        model.config.no_sync_func = ddp.no_sync
        model.config.grad_scale_func = optimizer.scale_loss
        chunks = [ddp] if layout.pp == 1 else [PipelineChunk(ddp, plan) for plan in model.chunks]
        return cls(cfg, layout, ddp, chunks, optimizer, scheduler)

    def data(self, source: Iterator):
        """The schedule's data_iterator: the source, or one view of it per virtual chunk."""
        if len(self.chunks) == 1:
            return source
        tee = ChunkBatches(source, len(self.chunks))
        return [tee.iterator(i) for i in range(len(self.chunks))]
