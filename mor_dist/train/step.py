"""One optimizer step and one evaluation pass through megatron's forward_backward_func."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mor_dist.config import RunConfig
from mor_dist.model.routing import AuxLossAttacher, TokenChoiceRouter
from mor_dist.parallel.pipeline import ChunkBatches, PipelineChunk, message_rows


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The MoRModel inside a DDP wrapper or behind a PipelineChunk."""
    return getattr(chunk, "module", chunk)


@dataclass
class Stage:
    """This rank's model as the schedules need it: one DDP holding the weights, and its chunks."""

    ddp: torch.nn.Module
    chunks: list[torch.nn.Module]
    message_rows: int  # the sequence length of stage-to-stage messages

    @classmethod
    def build(cls, cfg: RunConfig, ddp: torch.nn.Module) -> "Stage":
        model = unwrap(ddp)
        if cfg.parallel.pp == 1:
            return cls(ddp, [ddp], cfg.model.seq_length)
        return cls(ddp, [PipelineChunk(ddp, vs) for vs in model.chunks], message_rows(cfg, model.routed))

    def data(self, source: Iterator):
        """The schedule's data_iterator: the source, or one view of it per virtual chunk."""
        if len(self.chunks) == 1:
            return source
        tee = ChunkBatches(source, len(self.chunks))
        return [tee.iterator(i) for i in range(len(self.chunks))]


class StepState:
    """Per-step accumulation of router statistics across micro-batches."""

    def __init__(self) -> None:
        self.router: list[dict[str, torch.Tensor]] = []
        self.tokens: list[torch.Tensor] = []  # per micro-batch, [b, s] (kept in eval only)
        self.depths: list[torch.Tensor] = []  # recursions each token took, [b, s]

    def router_means(self) -> dict[str, float]:
        """Mean of each router statistic over the calls that produced it; aux_loss sums the recursions'."""
        keys = sorted({k for stats in self.router for k in stats})
        means = {f"router/{k}": float(torch.stack([s[k].float() for s in self.router if k in s]).mean())
                 for k in keys}
        aux = [v for k, v in means.items() if k.endswith("/aux_loss")]
        if aux:
            means["router/aux_loss"] = sum(aux)
        return means


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of per-token losses over the mask; megatron divides by the count and micro-batches."""
    total = (output.float() * loss_mask).sum()
    count = loss_mask.sum()
    return total, count.to(torch.int), {"lm_loss": torch.stack([total.detach(), count.detach().float()])}


def _forward_step(state: StepState, data_iterator: Iterator, model: torch.nn.Module):
    batch = next(data_iterator)
    inner = unwrap(model)
    device = next(inner.parameters()).device
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    output = model(tokens, labels=labels)
    state.router.append(inner.router_stats)
    if not inner.training and inner.token_depths is not None:
        state.tokens.append(batch["tokens"])
        state.depths.append(inner.token_depths.cpu())
    return output, partial(_loss_func, batch["loss_mask"].to(device))


def _lm_loss(reduced: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    if not parallel_state.is_pipeline_last_stage() or not reduced:
        return {}
    total = torch.stack([r["lm_loss"] for r in reduced]).sum(0)
    return {"lm_loss": float(total[0] / total[1])}


def run_microbatches(stage: Stage, data_iterator: Iterator, num_microbatches: int, micro_batch_size: int,
                     forward_only: bool) -> tuple[dict[str, float], StepState]:
    """forward (and backward) over the step's micro-batches; returns local metrics."""
    state = StepState()
    AuxLossAttacher.scale = 1.0 / num_microbatches
    reduced = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, state),
        data_iterator=stage.data(data_iterator),
        model=stage.chunks,
        num_microbatches=num_microbatches,
        seq_length=stage.message_rows,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return _lm_loss(reduced), state


def train_step(stage: Stage, optimizer, scheduler, data_iterator, num_microbatches: int,
               micro_batch_size: int) -> dict[str, float]:
    """Zero grads, forward/backward all micro-batches, clip and step; local (unreduced) metrics."""
    stage.ddp.zero_grad_buffer()
    optimizer.zero_grad()
    metrics, state = run_microbatches(stage, data_iterator, num_microbatches, micro_batch_size, False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    router = unwrap(stage.ddp).router
    if isinstance(router, TokenChoiceRouter):
        router.update_bias(parallel_state.get_data_parallel_group())
    metrics.update(state.router_means())
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["skipped"] = 0.0 if ok else 1.0
    return metrics


@torch.no_grad()
def evaluate(stage: Stage, batches: list[dict[str, torch.Tensor]],
             micro_batch_size: int) -> tuple[dict[str, float], StepState]:
    """Validation loss over fixed batches (eval mode: routing follows routing.inference_rule).

    The returned state holds the validation tokens and each token's depth on the router's stage.
    """
    stage.ddp.eval()
    metrics, state = run_microbatches(stage, iter(batches), len(batches), micro_batch_size, True)
    stage.ddp.train()
    return ({"val_loss": metrics["lm_loss"]} if metrics else {}), state
