"""One optimizer step and one evaluation pass through megatron's forward_backward_func."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mor_dist.model.routing import AuxLossAttacher, TokenChoiceRouter
from mor_dist.train.trainable import Trainable


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The MoRModel inside a DDP wrapper or behind a PipelineChunk."""
    return getattr(chunk, "module", chunk)


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


def run_microbatches(run: Trainable, data_iterator: Iterator, num_microbatches: int,
                     forward_only: bool) -> tuple[dict[str, float], StepState]:
    """forward (and backward) over `num_microbatches` micro-batches; returns local metrics."""
    state = StepState()
    AuxLossAttacher.scale = 1.0 / num_microbatches
    reduced = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, state),
        data_iterator=run.data(data_iterator),
        model=run.chunks,
        num_microbatches=num_microbatches,
        seq_length=run.layout.message_rows,
        micro_batch_size=run.cfg.train.micro_batch_size,
        forward_only=forward_only,
    )
    return _lm_loss(reduced), state


def train_step(run: Trainable, data_iterator: Iterator) -> dict[str, float]:
    """Zero grads, forward/backward the step's micro-batches, clip and step; local (unreduced) metrics."""
    optimizer = run.optimizer
    run.ddp.zero_grad_buffer()
    optimizer.zero_grad()
    metrics, state = run_microbatches(run, data_iterator, run.layout.micro_batches, False)
    ok, grad_norm, _ = optimizer.step()
    run.scheduler.step(increment=1)
    router = run.model.router
    if isinstance(router, TokenChoiceRouter):
        router.update_bias(parallel_state.get_data_parallel_group())
    metrics.update(state.router_means())
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = float(optimizer.param_groups[0]["lr"])
    metrics["skipped"] = 0.0 if ok else 1.0
    return metrics


def validation_keys(run: Trainable) -> list[str]:
    """The validation losses `evaluate` measures (the same on every rank)."""
    two_rules = run.layout.routed and run.cfg.routing.kind == "expert_choice"
    return ["val_loss", "val_causal_loss"] if two_rules else ["val_loss"]


@torch.no_grad()
def evaluate(run: Trainable, batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, float], StepState]:
    """Validation loss over fixed batches with top-k routing (the paper's), and for expert-choice MoR also with
    the causal threshold rule that generation uses (`val_causal_loss`).

    The returned state holds the validation tokens and each token's depth on the router's stage (top-k pass).
    """
    run.ddp.eval()
    model, losses, states = run.model, {}, {}
    rule = model.eval_rule
    try:
        for key, eval_rule in zip(validation_keys(run), ("topk", "threshold")):
            model.eval_rule = eval_rule
            metrics, states[eval_rule] = run_microbatches(run, iter(batches), len(batches), True)
            if metrics:
                losses[key] = metrics["lm_loss"]
    finally:
        model.eval_rule = rule
        run.ddp.train()
    return losses, states["topk"]
