"""One optimizer step and one evaluation pass through megatron's forward_backward_func."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mor_dist.model.routing import AuxLossAttacher, TokenChoiceRouter


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The MoRModel inside a DDP wrapper."""
    return getattr(chunk, "module", chunk)


class StepState:
    """Per-step accumulation of router statistics across micro-batches."""

    def __init__(self) -> None:
        self.router: list[dict[str, torch.Tensor]] = []
        self.tokens: list[torch.Tensor] = []  # per micro-batch, [b, s] (kept in eval only)
        self.depths: list[torch.Tensor] = []  # recursions each token took, [b, s]

    def router_means(self) -> dict[str, float]:
        if not self.router:
            return {}
        return {f"router/{k}": float(torch.stack([s[k].float() for s in self.router]).mean())
                for k in self.router[0]}


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of per-token losses over the mask; megatron divides by the count and micro-batches."""
    total = (output.float() * loss_mask).sum()
    count = loss_mask.sum()
    return total, count.to(torch.int), {"lm_loss": torch.stack([total.detach(), count.detach().float()])}


def _forward_step(state: StepState, data_iterator: Iterator, model: torch.nn.Module):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    output = model(tokens, labels=labels)
    inner = unwrap(model)
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


def run_microbatches(chunks: list[torch.nn.Module], data_iterator: Iterator, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool) -> tuple[dict[str, float], StepState]:
    """forward (and backward) over the step's micro-batches; returns local metrics."""
    state = StepState()
    AuxLossAttacher.scale = 1.0 / num_microbatches
    reduced = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, state),
        data_iterator=data_iterator,
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return _lm_loss(reduced), state


def train_step(chunks, optimizer, scheduler, data_iterator, num_microbatches: int, seq_length: int,
               micro_batch_size: int) -> dict[str, float]:
    """Zero grads, forward/backward all micro-batches, clip and step; local (unreduced) metrics."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics, state = run_microbatches(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size, False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    for chunk in chunks:
        router = unwrap(chunk).router
        if isinstance(router, TokenChoiceRouter):
            router.update_bias(parallel_state.get_data_parallel_group())
    metrics.update(state.router_means())
    if "lm_loss" in metrics:
        metrics["loss"] = metrics["lm_loss"] + metrics.get("router/aux_loss", 0.0)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["skipped"] = 0.0 if ok else 1.0
    return metrics


@torch.no_grad()
def evaluate(chunks, batches: list[dict[str, torch.Tensor]], seq_length: int,
             micro_batch_size: int) -> tuple[dict[str, float], StepState]:
    """Validation loss over fixed batches (eval mode: routing follows routing.inference_rule).

    The returned state holds the validation tokens and each token's depth on the router's stage.
    """
    for chunk in chunks:
        chunk.eval()
    metrics, state = run_microbatches(chunks, iter(batches), len(batches), seq_length, micro_batch_size, True)
    for chunk in chunks:
        chunk.train()
    return ({"val_loss": metrics["lm_loss"]} if metrics else {}), state
