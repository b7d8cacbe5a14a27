"""Tokens in flight: one entry per token, with its cache row, position, hidden state and routing state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Tokens:
    """A flat batch of tokens (any mix of sequences and depths); routing fields are set by the rule."""

    rows: torch.Tensor  # [n] cache row (sequence slot)
    pos: torch.Tensor  # [n] absolute position
    h: torch.Tensor  # [n, d] residual stream entering the recursions (token-choice: H1)
    depth: torch.Tensor  # [n] recursions done
    gate: Optional[torch.Tensor] = None  # [n, 1] expert-choice: next recursion's gate; token-choice: exit gate
    state: Optional[torch.Tensor] = None  # [n, d] token-choice: block state
    target: Optional[torch.Tensor] = None  # [n] token-choice: assigned depth

    def __len__(self) -> int:
        return self.rows.shape[0]

    def take(self, index: torch.Tensor) -> Tokens:
        """The tokens at a boolean mask or index tensor."""
        return Tokens(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                         for f in dataclasses.fields(self)})


def concat(parts: list[Optional[Tokens]]) -> Optional[Tokens]:
    """Concatenate non-empty batches; None when there are none."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return Tokens(**{f.name: None if getattr(parts[0], f.name) is None
                     else torch.cat([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(Tokens)})
