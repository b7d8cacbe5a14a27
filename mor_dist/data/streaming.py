"""Streamed training data, as `datasets` streams it: held-out documents filtered out, each data-parallel rank's
share (`split_dataset_by_node`), a shuffle buffer, and the stream's own `state_dict()` for resuming; documents
are packed on the fly in the worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

from mor_dist.layout import micro_batches_per_step
from mor_dist.data.packing import TokenBuffer, join_documents, make_batch
from mor_dist.data.mixture import Corpus
from mor_dist.data.split import is_validation
from mor_dist.data.tokenizer import Tokenizer


def document_tokens(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """A document's ids followed by EOS."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return join_documents(ids, np.array([len(ids)]), tokenizer.eos_id)


def training_stream(source: Corpus, validation_fraction: float, seed: int, dp_rank: int, dp_size: int,
                    shuffle_buffer: int) -> IterableDataset:
    """One DP rank's training documents: without the held-out ones; whole shards per rank when the shard count
    divides by dp_size (each rank reads only its files), else every dp_size-th record; shuffled in a buffer of
    `shuffle_buffer` documents (0: stream order), reshuffled each epoch."""
    column = source.text_column
    stream = source.stream().filter(lambda record: not is_validation(record[column] or "", validation_fraction, seed))
    stream = split_dataset_by_node(stream, rank=dp_rank, world_size=dp_size)
    return stream.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else stream


class StreamingTrainIterator:
    """Endless micro-batches of one DP rank from a stream; each pass over the stream is one epoch."""

    def __init__(self, source: Corpus, tokenizer: Tokenizer, seq_length: int, validation_fraction: float,
                 seed: int, dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int,
                 shuffle_buffer: int = 0) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, {dp_size})")
        self.micro_batches_per_step = micro_batches_per_step(dp_size, micro_batch_size, global_batch_size)
        self._source = source
        self._tokenizer = tokenizer
        self._seed = seed
        self._dp_rank, self._dp_size = dp_rank, dp_size
        self._micro_batch_size = micro_batch_size
        self._buffer = TokenBuffer(seq_length + 1)
        self._stream = training_stream(source, validation_fraction, seed, dp_rank, dp_size, shuffle_buffer)
        self._epoch = 0
        self._records: Iterator[dict[str, Any]] | None = None
        self._whole_pass, self._read = True, 0  # whether this pass started at its beginning; records read in it

    def __iter__(self) -> StreamingTrainIterator:
        return self

    def _fill(self) -> None:
        """Read documents until a micro-batch is pending; a finished pass starts the next epoch."""
        while self._buffer.full_rows() < self._micro_batch_size:
            if self._records is None:
                self._stream.set_epoch(self._epoch)  # the shuffle's seed for this pass
                self._records, self._whole_pass, self._read = iter(self._stream), True, 0
            record = next(self._records, None)
            if record is None:
                if self._whole_pass and self._read == 0:
                    raise RuntimeError(f"{self._source.label} has no training documents for "
                                       f"data-parallel rank {self._dp_rank} of {self._dp_size}")
                self._epoch, self._records = self._epoch + 1, None
                continue
            self._read += 1
            self._buffer.add(document_tokens(self._tokenizer, record[self._source.text_column] or ""))

    def __next__(self) -> dict[str, torch.Tensor]:
        self._fill()
        return make_batch(self._buffer.take(self._micro_batch_size))

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, the stream's own state (shard and record; a shuffle buffer's documents are not
        part of it), tokens read but not yet yielded."""
        return {"epoch": self._epoch, "stream": self._stream.state_dict() if self._records is not None else None,
                "pending_tokens": self._buffer.tokens(), "seed": self._seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the stream resumes at its saved shard and record, not from the start."""
        if state["seed"] != self._seed:
            raise ValueError(f"data position was saved with seed {state['seed']}, this run uses {self._seed}")
        if "stream" not in state:
            raise ValueError("this data position was saved by an earlier mor-dist (records counted from the start "
                             "of the stream); resume it with that version or start the run over (--start-over)")
        self._epoch = int(state["epoch"])
        self._buffer = TokenBuffer(self._buffer.row_length, state["pending_tokens"])
        self._stream.set_epoch(self._epoch)
        if state["stream"] is not None:
            self._stream.load_state_dict(state["stream"])
        self._records, self._whole_pass, self._read = iter(self._stream), state["stream"] is None, 0


def validation_rows(source: Corpus, tokenizer: Tokenizer, seq_length: int, validation_fraction: float, seed: int,
                    num_rows: int) -> np.ndarray:
    """The first `num_rows` packed rows of the held-out documents of a stream (fewer if it ends)."""
    buffer = TokenBuffer(seq_length + 1)
    for record in source.stream():
        text = record[source.text_column] or ""
        if is_validation(text, validation_fraction, seed):
            buffer.add(document_tokens(tokenizer, text))
            if buffer.full_rows() >= num_rows:
                break
    return buffer.take(min(num_rows, buffer.full_rows()))
