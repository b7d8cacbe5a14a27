"""Deterministic, resumable micro-batches for one data-parallel rank, and fixed validation batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mor_dist.data.packing import make_batch
from mor_dist.layout import micro_batches_per_step


class TrainIterator:
    """Endless micro-batches of one DP rank; each step takes global_batch_size sequences of a seeded
    per-epoch permutation, DP rank d takes the d-th contiguous share, cut into micro-batches."""

    def __init__(self, sequences: np.ndarray, seed: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                 global_batch_size: int) -> None:
        if len(sequences) == 0:
            raise ValueError("no training sequences")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, {dp_size})")
        self.micro_batches_per_step = micro_batches_per_step(dp_size, micro_batch_size, global_batch_size)
        self._sequences = sequences
        self._seed = seed
        self._dp_rank = dp_rank
        self._dp_size = dp_size
        self._micro_batch_size = micro_batch_size
        self._global_batch_size = global_batch_size
        self._consumed = 0  # sequences taken by all DP ranks in completed steps
        self._micro = 0  # micro-batches this rank has yielded in the current step
        self._permutations: dict[int, np.ndarray] = {}

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        share = self._global_batch_size // self._dp_size
        start = self._consumed + self._dp_rank * share + self._micro * self._micro_batch_size
        rows = self._rows(np.arange(start, start + self._micro_batch_size))
        self._micro += 1
        if self._micro == self.micro_batches_per_step:
            self._micro = 0
            self._consumed += self._global_batch_size
        return make_batch(rows)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Order of the sequences in one epoch (the last two are kept)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            self._permutations[epoch] = np.random.default_rng([self._seed, epoch]).permutation(len(self._sequences))
        return self._permutations[epoch]

    def _rows(self, positions: np.ndarray) -> np.ndarray:
        """The sequences at global stream positions (position // n is the epoch)."""
        n = len(self._sequences)
        indices = [self._permutation(int(p) // n)[int(p) % n] for p in positions]
        return self._sequences[indices]

    def state_dict(self) -> dict[str, Any]:
        """The exact position: sequences consumed by whole steps, micro-batches into the current step."""
        return {"consumed_samples": self._consumed, "micro_batch": self._micro,
                "epoch": self._consumed // len(self._sequences), "num_sequences": len(self._sequences),
                "seed": self._seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` taken on the same data and seed."""
        if state["num_sequences"] != len(self._sequences) or state["seed"] != self._seed:
            raise ValueError(f"data position was saved for {state['num_sequences']} sequences and seed "
                             f"{state['seed']}, this data has {len(self._sequences)} and seed {self._seed}")
        if not 0 <= state["micro_batch"] < self.micro_batches_per_step:
            raise ValueError(f"saved micro_batch={state['micro_batch']} does not fit "
                             f"{self.micro_batches_per_step} micro-batches per step")
        self._consumed = int(state["consumed_samples"])
        self._micro = int(state["micro_batch"])


def validation_batches(sequences: np.ndarray, dp_rank: int, dp_size: int, micro_batch_size: int,
                       num_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first `num_batches` micro-batches of rank `dp_rank` (fewer if the split is short, same on all ranks)."""
    per_round = micro_batch_size * dp_size
    available = len(sequences) // per_round
    if available == 0:
        raise ValueError(f"{len(sequences)} validation sequences cannot fill one micro-batch on each of "
                         f"{dp_size} ranks (micro_batch_size={micro_batch_size})")
    batches = []
    for i in range(min(num_batches, available)):
        start = (i * dp_size + dp_rank) * micro_batch_size
        batches.append(make_batch(sequences[start:start + micro_batch_size]))
    return batches
