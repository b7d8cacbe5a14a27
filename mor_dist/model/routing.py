"""Expert-choice and token-choice MoR routers: capacities, selection, auxiliary losses, causal rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mor_dist.config import RoutingConfig


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """k_r = max(1, floor(c_r * L)) of the full length."""
    return max(1, int(capacity * seq_len))


def padded_rows(k: int, multiple: int, limit: int) -> int:
    """k rounded up to `multiple` (FP8 GEMMs want 16 rows, sequence parallelism a multiple of tp), at most limit."""
    return min(limit, -(-k // multiple) * multiple)


def gather_tokens(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[s, b, d] gathered at per-row indices [b, k] -> [k, b, d] (sequence-first)."""
    index = idx.t().unsqueeze(-1).expand(-1, -1, h.shape[-1])
    return h.gather(0, index)


def scatter_add_tokens(h: torch.Tensor, idx: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """h with `update` [k, b, d] added at per-row indices [b, k] (out of place)."""
    index = idx.t().unsqueeze(-1).expand(-1, -1, h.shape[-1])
    return h.scatter_add(0, index, update)


def gather_rotary(freqs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """RoPE angles [s, 1, 1, d] at the tokens' original positions -> [k, b, 1, d]."""
    return freqs[:, 0, 0, :][idx.t()].unsqueeze(2)


def ragged_indices(active: torch.Tensor, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Active mask [b, s] -> sorted indices [b, kmax] and validity [b, kmax]; padding sits at the end.

    Padding at the end means causal attention never lets a real token see a padded one. kmax is rounded
    up to `multiple` (FP8 GEMMs, sequence-parallel shards) with more padded rows.
    """
    b, s = active.shape
    kmax = padded_rows(int(active.sum(1).max().item()), multiple, s) if active.numel() else 0
    positions = torch.arange(s, device=active.device).expand(b, s)
    # Active tokens first in position order, inactive after: sort on (inactive, position).
    order = torch.argsort(positions + (~active).long() * s, dim=1)[:, :kmax]
    valid = active.gather(1, order)
    return order, valid


@dataclass
class Selection:
    """Tokens that take one recursion: indices [b, k] (sorted), gate [k, b, 1], validity or None."""

    indices: torch.Tensor
    gate: Optional[torch.Tensor]
    valid: Optional[torch.Tensor] = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class AuxLossAttacher(torch.autograd.Function):
    """Return `x` unchanged; in backward, give `aux_loss` the gradient `scale` (MoE's auto-scaler idea).

    This lets auxiliary losses computed on any pipeline stage join the backward pass of the main loss.
    """

    scale: float = 1.0

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, AuxLossAttacher.scale)


def _init_linear(rows: int, cols: int, std: float, dtype: torch.dtype) -> torch.nn.Parameter:
    weight = torch.empty(rows, cols, dtype=torch.float32)
    torch.nn.init.normal_(weight, mean=0.0, std=std)
    return torch.nn.Parameter(weight.to(dtype))


class ExpertChoiceRouter(MegatronModule):
    """One linear router per recursion; per-sequence top-k over the surviving candidates."""

    def __init__(self, config: TransformerConfig, routing: RoutingConfig, capacities: list[float],
                 token_multiple: int = 1) -> None:
        super().__init__(config)
        self.routing = routing
        self.capacities = capacities
        self.alpha = 0.1 if routing.alpha is None else routing.alpha
        self.activation = routing.activation or "sigmoid"
        self.token_multiple = token_multiple
        n, h = len(capacities), config.hidden_size
        self.weight = _init_linear(n, h, config.init_method_std, config.params_dtype)
        self.aux_weight = _init_linear(n, h, config.init_method_std, config.params_dtype) if routing.aux_router else None

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "tanh":
            return torch.tanh(logits)
        raise ValueError("expert-choice routing needs routing.activation sigmoid or tanh")

    @staticmethod
    def rule_score(logits: torch.Tensor, aux_logits: Optional[torch.Tensor]) -> torch.Tensor:
        """What the causal rule thresholds: sigmoid of the (aux) router logits, which the BCE loss calibrates
        towards top-k membership, whatever activation the gate uses."""
        return torch.sigmoid(aux_logits if aux_logits is not None else logits)

    def select(self, r: int, h: torch.Tensor, prev: Optional[Selection], causal: bool) -> tuple[Selection, torch.Tensor]:
        """Choose recursion r's tokens among prev's; returns the selection and its auxiliary loss."""
        s, b, _ = h.shape
        cand_idx = prev.indices if prev is not None else torch.arange(s, device=h.device).expand(b, s)
        cand_valid = prev.valid if prev is not None else None
        x = gather_tokens(h, cand_idx)  # [c, b, d]
        logits = (x @ self.weight[r].unsqueeze(-1)).squeeze(-1).t().float()  # [b, c]
        probs = self._activate(logits)
        aux_logits = None if self.aux_weight is None else \
            (x.detach() @ self.aux_weight[r].unsqueeze(-1)).squeeze(-1).t().float()
        if causal and self.capacities[r] >= 1.0:
            local, valid = ragged_indices(cand_valid if cand_valid is not None else torch.ones_like(probs, dtype=torch.bool),
                                          self.token_multiple)
        elif causal:
            active = self.rule_score(logits, aux_logits) >= self.routing.threshold
            if cand_valid is not None:
                active &= cand_valid
            local, valid = ragged_indices(active, self.token_multiple)
        else:
            local, valid = self._top_k(probs, capacity_tokens(self.capacities[r], s), cand_valid)
        chosen = torch.zeros_like(probs).scatter(1, local, 1.0 if valid is None else valid.float())
        aux, aux_parts = self._aux_losses(logits, aux_logits, chosen, cand_valid)
        weights = probs.gather(1, local) * self.alpha
        if self.routing.gating == "identity":
            weights = torch.ones_like(weights)
        count = torch.tensor(float(local.shape[1])) if valid is None else valid.sum(1).float().mean()
        stats = {
            f"r{r + 1}/selected_frac": count.detach() / s,
            f"r{r + 1}/mean_weight": weights.detach().mean(),
            f"r{r + 1}/rule_agreement": ((self.rule_score(logits, aux_logits).detach() >= self.routing.threshold)
                                         .float() == chosen).float().mean(),
            **{f"r{r + 1}/{name}": value.detach() for name, value in aux_parts.items()},
        }
        sel = Selection(cand_idx.gather(1, local), weights.t().unsqueeze(-1).to(h.dtype), valid, stats)
        return sel, aux

    def _top_k(self, probs: torch.Tensor, k: int, cand_valid: Optional[torch.Tensor],
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The k best candidates in position order; masked rows after them up to the token multiple, so the model
        selects exactly k whatever the rounding (validity None when no row is masked)."""
        if cand_valid is not None:
            probs = probs.masked_fill(~cand_valid, float("-inf"))
        top = torch.topk(probs, k, dim=1, sorted=False).indices
        if self.token_multiple == 1:
            return top.sort(dim=1).values, None
        local, valid = ragged_indices(torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True),
                                      self.token_multiple)
        return local, (None if bool(valid.all()) else valid)

    def _aux_losses(self, logits: torch.Tensor, aux_logits: Optional[torch.Tensor], chosen: torch.Tensor,
                    cand_valid: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BCE towards the top-k membership (the causal rule's training signal), z-loss, aux router; padded
        candidates (after a causal recursion) count in neither the sum nor the mean.

        Returns the total and each weighted term by name.
        """
        def bce(values: torch.Tensor) -> torch.Tensor:
            if cand_valid is None:
                return F.binary_cross_entropy_with_logits(values, chosen)
            weight = cand_valid.float()
            total = F.binary_cross_entropy_with_logits(values, chosen, weight=weight, reduction="sum")
            return total / weight.sum().clamp(min=1.0)

        parts = {"bce_loss": self.routing.aux_loss_coeff * bce(logits)}
        if self.routing.z_loss_coeff:
            parts["z_loss"] = self.routing.z_loss_coeff * logits.pow(2).mean()
        if aux_logits is not None:
            parts["aux_router_loss"] = bce(aux_logits)
        return sum(parts.values()), parts


class TokenChoiceRouter(MegatronModule):
    """One router after the first layer assigns each token a depth (top-1 of N_r), with balancing."""

    def __init__(self, config: TransformerConfig, routing: RoutingConfig, num_recursions: int) -> None:
        super().__init__(config)
        self.routing = routing
        self.num_recursions = num_recursions
        self.alpha = 1.0 if routing.alpha is None else routing.alpha
        self.activation = routing.activation or "softmax"
        self.weight = _init_linear(num_recursions, config.hidden_size, config.init_method_std, config.params_dtype)
        # Loss-free balancing: a non-trained bias on the probabilities, used for the top-1 choice only.
        self.register_buffer("bias", torch.zeros(num_recursions), persistent=True)
        self.register_buffer("load", torch.zeros(num_recursions), persistent=False)

    def assign(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Depth per token [b, s] (1..N_r), gate [s, b, 1], auxiliary loss, stats."""
        logits = (h @ self.weight.t()).float()  # [s, b, N_r]
        if self.activation == "softmax":
            probs = logits.softmax(-1)
        elif self.activation == "sigmoid":
            probs = torch.sigmoid(logits)
        else:
            raise ValueError("token-choice routing needs routing.activation softmax or sigmoid")
        choice = (probs + self.bias).argmax(-1) if self.routing.loss_free_balancing else probs.argmax(-1)
        gate = probs.gather(-1, choice.unsqueeze(-1)) * self.alpha
        if self.routing.gating == "identity":
            gate = torch.ones_like(gate)
        n = self.num_recursions
        frac = F.one_hot(choice, n).float().mean(dim=(0, 1))
        parts: dict[str, torch.Tensor] = {}
        if not self.routing.loss_free_balancing:
            parts["balance_loss"] = self.routing.balance_loss_coeff * (n * frac * probs.mean(dim=(0, 1))).sum()
        if self.routing.z_loss_coeff:
            parts["z_loss"] = self.routing.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
        aux = sum(parts.values(), logits.new_zeros(()))
        if self.training:
            self.load += frac.detach()
        stats = {f"r{i + 1}/depth_frac": frac[i].detach() for i in range(n)}
        stats["max_violation"] = (frac.max() * n - 1.0).detach()
        stats.update({name: value.detach() for name, value in parts.items()})
        return (choice + 1).t(), gate.to(h.dtype), aux, stats

    @torch.no_grad()
    def update_bias(self, group: Optional[torch.distributed.ProcessGroup] = None) -> None:
        """After an optimizer step: b_i += u * sign(mean_load - load_i) (loads summed over micro-batches)."""
        if not self.routing.loss_free_balancing:
            return
        load = self.load.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=group)
        self.bias += self.routing.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()
