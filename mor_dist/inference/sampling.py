"""Next-token choice: greedy, or temperature sampling with optional top-k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Sampler:
    """temperature 0 is greedy; `vocab_limit` hides the padded part of the vocabulary."""

    temperature: float = 0.0
    top_k: int = 0
    vocab_limit: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.generator: Optional[torch.Generator] = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, vocab] -> token ids [n]."""
        if self.vocab_limit is not None:
            logits = logits[:, :self.vocab_limit]
        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[:, 0]
