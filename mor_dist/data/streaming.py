"""On-the-fly packing of a streamed dataset in the worker; position = documents read + pending tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mor_dist.layout import micro_batches_per_step
from mor_dist.data.packing import TokenBuffer, join_documents, make_batch
from mor_dist.data.sources import Source
from mor_dist.data.split import is_validation
from mor_dist.data.tokenizer import Tokenizer


def stream_texts(source: Source, start: int = 0) -> Iterator[tuple[int, str]]:
    """(document index, text) for each record of one pass over the stream, from record `start`."""
    dataset = source.stream()
    for offset, record in enumerate(dataset.skip(start) if start else dataset):
        yield start + offset, record[source.text_column] or ""


def document_tokens(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """A document's ids followed by EOS."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return join_documents(ids, np.array([len(ids)]), tokenizer.eos_id)


class StreamingTrainIterator:
    """Endless micro-batches of one DP rank from a stream: training documents (not held out) whose
    index is dp_rank modulo dp_size, packed in order; each pass over the stream is one epoch."""

    def __init__(self, source: Source, tokenizer: Tokenizer, seq_length: int, validation_fraction: float,
                 seed: int, dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, {dp_size})")
        self.micro_batches_per_step = micro_batches_per_step(dp_size, micro_batch_size, global_batch_size)
        self._source = source
        self._tokenizer = tokenizer
        self._validation_fraction = validation_fraction
        self._seed = seed
        self._dp_rank = dp_rank
        self._dp_size = dp_size
        self._micro_batch_size = micro_batch_size
        self._buffer = TokenBuffer(seq_length + 1)
        self._epoch = 0
        self._documents_read = 0  # records of the current pass already in the buffer (or skipped)
        self._documents: Iterator[tuple[int, str]] | None = None

    def __iter__(self) -> StreamingTrainIterator:
        return self

    def _mine(self, index: int) -> bool:
        """Whether document `index` is a training document of this DP rank."""
        return (index % self._dp_size == self._dp_rank
                and not is_validation(index, self._validation_fraction, self._seed))

    def _fill(self) -> None:
        """Read documents until a micro-batch is pending; a finished pass starts the next epoch."""
        ends_without_use = 0  # two pass ends with nothing used in between: a whole pass had nothing for us
        while self._buffer.full_rows() < self._micro_batch_size:
            if self._documents is None:
                self._documents = stream_texts(self._source, self._documents_read)
            item = next(self._documents, None)
            if item is None:
                ends_without_use += 1
                if ends_without_use == 2:
                    raise RuntimeError(f"data.dataset={self._source.spec!r} has no training documents for "
                                       f"data-parallel rank {self._dp_rank} of {self._dp_size}")
                self._epoch, self._documents_read, self._documents = self._epoch + 1, 0, None
                continue
            index, text = item
            self._documents_read = index + 1
            if self._mine(index):
                self._buffer.add(document_tokens(self._tokenizer, text))
                ends_without_use = 0

    def __next__(self) -> dict[str, torch.Tensor]:
        self._fill()
        return make_batch(self._buffer.take(self._micro_batch_size))

    def state_dict(self) -> dict[str, Any]:
        """The exact position: epoch, records read in this pass, tokens read but not yet yielded."""
        return {"epoch": self._epoch, "documents_read": self._documents_read, "pending_tokens": self._buffer.tokens(),
                "seed": self._seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` (the stream is re-opened and skips the records already read)."""
        if state["seed"] != self._seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, this run uses {self._seed}")
        self._epoch = int(state["epoch"])
        self._documents_read = int(state["documents_read"])
        self._buffer = TokenBuffer(self._buffer.row_length, state["pending_tokens"])
        self._documents = None


def validation_rows(source: Source, tokenizer: Tokenizer, seq_length: int, validation_fraction: float, seed: int,
                    num_rows: int) -> np.ndarray:
    """The first `num_rows` packed rows of the held-out documents of a stream (fewer if it ends)."""
    buffer = TokenBuffer(seq_length + 1)
    for index, text in stream_texts(source):
        if is_validation(index, validation_fraction, seed):
            buffer.add(document_tokens(tokenizer, text))
            if buffer.full_rows() >= num_rows:
                break
    return buffer.take(min(num_rows, buffer.full_rows()))
