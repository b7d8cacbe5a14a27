"""Routing at generation time, token by token, with the causal semantics of MoRModel.forward(causal_routing=True)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from mor_dist.inference.tokens import Tokens
from mor_dist.model.routing import ExpertChoiceRouter, TokenChoiceRouter


class ExpertRule:
    """Expert-choice: continue at recursion r iff the router passes its threshold and the token was active at r-1.

    Capacity-1.0 recursions take every token; the gate is alpha * act(logit) and the update h + w * f(h).
    `thresholds` (one per recursion) default to routing.threshold; `trace` records the scores when set.
    """

    def __init__(self, router: ExpertChoiceRouter, num_recursions: int,
                 thresholds: Optional[list[float]] = None) -> None:
        self.router, self.n = router, num_recursions
        self.trace: Optional[dict[int, list[torch.Tensor]]] = None
        device = router.weight.device
        self._takes_all = torch.tensor([c >= 1.0 for c in router.capacities], device=device)
        self._threshold = torch.tensor(thresholds if thresholds is not None else [router.routing.threshold] * num_recursions,
                                       dtype=torch.float32, device=device)

    def _select(self, toks: Tokens) -> torch.Tensor:
        """Decide recursion toks.depth for each token; sets its gate; returns the tokens that take it."""
        router = self.router
        r = toks.depth.clamp(max=self.n - 1)
        logits = (toks.h @ router.weight.t()).float().gather(1, r[:, None])[:, 0]
        probs = router._activate(logits)
        aux_logits = None if router.aux_weight is None else \
            (toks.h @ router.aux_weight.t()).float().gather(1, r[:, None])[:, 0]
        decide = router.rule_score(logits, aux_logits)
        takes_all, threshold = self._takes_all[r], self._threshold[r]
        live = toks.depth < self.n
        if self.trace is not None:
            for i in range(self.n):
                self.trace.setdefault(i, []).append(decide[(r == i) & live])
        gate = probs * router.alpha if router.routing.gating != "identity" else torch.ones_like(probs)
        toks.gate = gate[:, None].to(toks.h.dtype)
        return (takes_all | (decide >= threshold)) & live

    def enter(self, toks: Tokens) -> torch.Tensor:
        """After the prefix layers: which tokens take recursion 1."""
        return self._select(toks)

    def advance(self, toks: Tokens) -> torch.Tensor:
        """After a recursion: which tokens take the next one."""
        return self._select(toks)

    def block_input(self, toks: Tokens) -> torch.Tensor:
        return toks.h

    def update(self, toks: Tokens, out: torch.Tensor) -> None:
        toks.h = toks.h + toks.gate * out  # h + w * f(h), f the block output with its residual

    def exit_hidden(self, toks: Tokens) -> torch.Tensor:
        return toks.h


class TokenRule:
    """Token-choice: one router after the prefix assigns a depth; state replaced while active; exit H1 + w * x."""

    def __init__(self, router: TokenChoiceRouter) -> None:
        self.router = router

    def enter(self, toks: Tokens) -> torch.Tensor:
        depth, gate, _, _ = self.router.assign(toks.h[:, None])
        toks.target, toks.gate, toks.state = depth[0], gate[:, 0], toks.h
        return toks.target >= 1

    def advance(self, toks: Tokens) -> torch.Tensor:
        return toks.depth < toks.target

    def block_input(self, toks: Tokens) -> torch.Tensor:
        return toks.state

    def update(self, toks: Tokens, out: torch.Tensor) -> None:
        toks.state = out

    def exit_hidden(self, toks: Tokens) -> torch.Tensor:
        return toks.h + toks.gate * toks.state


Rule = Union[ExpertRule, TokenRule]


def make_rule(router: Optional[torch.nn.Module], num_recursions: int,
              thresholds: Optional[list[float]] = None) -> Optional[Rule]:
    """The rule for a model's router (None for vanilla and recursive models)."""
    if router is None:
        return None
    if isinstance(router, ExpertChoiceRouter):
        return ExpertRule(router, num_recursions, thresholds)
    return TokenRule(router)
