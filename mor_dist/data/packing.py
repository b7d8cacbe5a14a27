"""Documents joined with EOS and cut into rows of seq_length + 1 tokens (inputs plus shifted labels)."""

from __future__ import annotations

import numpy as np
import torch


def join_documents(values: np.ndarray, lengths: np.ndarray, eos_id: int) -> np.ndarray:
    """One token stream from flat document ids and their lengths, each document followed by EOS."""
    stream = np.empty(len(values) + len(lengths), dtype=np.int64)
    is_eos = np.zeros(len(stream), dtype=bool)
    is_eos[np.cumsum(np.asarray(lengths, dtype=np.int64) + 1) - 1] = True
    stream[is_eos] = eos_id
    stream[~is_eos] = values
    return stream


class TokenBuffer:
    """Pending tokens of a document stream, handed out as whole rows of `row_length` tokens."""

    def __init__(self, row_length: int, tokens: list[int] | np.ndarray = ()) -> None:
        self.row_length = row_length
        self._tokens = np.asarray(tokens, dtype=np.int64)

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens at the end."""
        self._tokens = np.concatenate([self._tokens, tokens.astype(np.int64, copy=False)])

    def full_rows(self) -> int:
        """How many whole rows are pending."""
        return len(self._tokens) // self.row_length

    def take(self, rows: int) -> np.ndarray:
        """Remove and return the first `rows` rows, shape [rows, row_length]."""
        size = rows * self.row_length
        if size > len(self._tokens):
            raise ValueError(f"only {self.full_rows()} rows pending, asked for {rows}")
        taken, self._tokens = self._tokens[:size], self._tokens[size:]
        return taken.reshape(rows, self.row_length)

    def tokens(self) -> list[int]:
        """The pending tokens (for a resumable state)."""
        return self._tokens.tolist()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def make_batch(rows: np.ndarray) -> dict[str, torch.Tensor]:
    """A micro-batch from rows of seq_length + 1 tokens: tokens, labels (shifted by one), loss_mask."""
    ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "loss_mask": torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.float32),
    }
