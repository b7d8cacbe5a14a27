"""Driver-side preparation (validate, tokenize, split, pack, cache) and the worker-side handle to the result."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from datasets import Dataset

from mor_dist.config import JobConfig
from mor_dist.errors import ConfigError
from mor_dist.data.cache import FORMAT, cache_key, publish, read_manifest, staging_directory
from mor_dist.data.iterator import TrainIterator, validation_batches
from mor_dist.data.mixture import SOURCE, Corpus, Mixture, corpus_from_dict, resolve_corpus
from mor_dist.data.packing import TokenBuffer, join_documents, token_dtype
from mor_dist.data.split import held_out_by_text, split_documents
from mor_dist.data.streaming import StreamingTrainIterator, validation_rows
from mor_dist.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json

TOKENIZER_FILE = "tokenizer.json"
PROGRESS_BAR_DOCUMENTS = 100_000  # tokenizing fewer documents takes seconds: a phase line says it, no bar


@dataclass(frozen=True)
class PreparedData:
    """Prepared data in a cache directory: picklable, and cheap to open again on every worker."""

    directory: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, directory: str | Path) -> PreparedData:
        """Re-open a cache entry written by `prepare_data`."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory} holds no prepared data; run prepare_data first")
        return cls(directory, manifest)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (unpadded)."""
        return self.manifest["vocab_size"]

    @property
    def eos_id(self) -> int:
        """End-of-text id that joins documents."""
        return self.manifest["eos_id"]

    @property
    def seq_length(self) -> int:
        """Context length the rows were packed for (rows hold one more token)."""
        return self.manifest["seq_length"]

    @property
    def streaming(self) -> bool:
        """Whether training data is streamed and packed in the workers."""
        return self.manifest["streaming"]

    def corpus(self) -> Corpus:
        """Where the documents come from: one source, or a mixture."""
        return corpus_from_dict(self.manifest["source"])

    def describe(self) -> str:
        """One line: the prepared sizes, where they are cached, and a mixture's sources."""
        seqs, seq = self.manifest["num_sequences"], self.seq_length
        if self.streaming:
            line = f"data: streamed; {seqs['validation']:,} validation sequences of {seq} tokens in {self.directory}"
        else:
            tokens = self.manifest["num_tokens"]
            line = (f"data: {seqs['train']:,} training / {seqs['validation']:,} validation sequences of {seq} tokens "
                    f"({tokens['train']:,} / {tokens['validation']:,} tokens) in {self.directory}")
        return line + self._describe_mixture()

    def _describe_mixture(self) -> str:
        """'; mixture ...' for a mixture: each source's weight and, when cached, its share of the training
        documents (empty for one source)."""
        corpus = self.corpus()
        if not isinstance(corpus, Mixture):
            return ""
        if self.streaming:
            return "; mixture weights " + ", ".join(f"{s.name} {w:.2f}" for s, w in zip(corpus.sources, corpus.weights))
        counts = self.manifest["num_documents_by_source"]["train"]
        shares = ", ".join(f"{s.name} {w:.2f} -> {n / sum(counts):.1%} ({n:,})"
                           for s, w, n in zip(corpus.sources, corpus.weights, counts))
        return f"; mixture (weight -> share of the training documents): {shares}"

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the data was prepared with (from the cache, no network)."""
        content = (self.directory / TOKENIZER_FILE).read_text()
        return tokenizer_from_json(self.manifest["tokenizer"], content, self.eos_id)

    def sequences(self, split: str) -> np.ndarray:
        """Packed rows [n, seq_length + 1] of a split, memory-mapped (streams keep only validation)."""
        return np.load(self.directory / f"{split}.npy", mmap_mode="r")

    def train_iterator(self, dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int,
                       seed: int | None = None, shuffle_buffer: int = 0) -> TrainIterator | StreamingTrainIterator:
        """Endless training micro-batches for one DP rank (seed: default the one the data was prepared with;
        shuffle_buffer: documents a stream shuffles in, 0 for stream order)."""
        seed = self.manifest["seed"] if seed is None else seed
        if self.streaming:
            return StreamingTrainIterator(self.corpus(), self.tokenizer(), self.seq_length,
                                          self.manifest["validation_fraction"], seed, dp_rank, dp_size,
                                          micro_batch_size, global_batch_size, shuffle_buffer)
        return TrainIterator(self.sequences("train"), seed, dp_rank, dp_size, micro_batch_size, global_batch_size)

    def validation_batches(self, dp_rank: int, dp_size: int, micro_batch_size: int,
                           num_batches: int) -> list[dict[str, torch.Tensor]]:
        """A fixed list of validation micro-batches for one DP rank (same count on every rank)."""
        return validation_batches(self.sequences("validation"), dp_rank, dp_size, micro_batch_size, num_batches)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """datasets' progress bars on or off for a block (they are process-wide)."""
    from datasets import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    was = is_progress_bar_enabled()
    (enable_progress_bars if show else disable_progress_bars)()
    try:
        yield
    finally:
        (enable_progress_bars if was else disable_progress_bars)()


def _tokenize(batch: dict[str, list[Any]], tokenizer: Tokenizer, column: str) -> dict[str, list[Any]]:
    """`datasets.map` function: ids (int32) and their count per document."""
    ids = tokenizer.encode_batch([text or "" for text in batch[column]])
    return {"ids": [np.asarray(x, dtype=np.int32) for x in ids], "length": [len(x) for x in ids]}


def _check_sizes(cfg: JobConfig, label: str, train_rows: int | None, validation_rows: int) -> None:
    """Enough packed rows for training and for one validation micro-batch on every DP rank (label: how messages
    name the data)."""
    seq = cfg.model.seq_length
    if train_rows == 0:
        raise ConfigError(f"{label} has too few tokens for one training sequence of model.seq_length={seq} + 1 "
                          "tokens; use more data or a shorter model.seq_length")
    needed = cfg.train.micro_batch_size * cfg.parallel.dp
    if validation_rows < needed:
        raise ConfigError(
            f"data.validation_fraction={cfg.data.validation_fraction} holds out {validation_rows} sequences of "
            f"{seq + 1} tokens; validation needs train.micro_batch_size * parallel.dp = {needed}; raise "
            "data.validation_fraction or use more data")


def _write_rows(tokenized: Dataset, documents: np.ndarray, rows: int, eos_id: int, row_length: int,
                dtype: np.dtype, path: Path) -> None:
    """Pack the given documents (in order, each followed by EOS) into `rows` rows of a memory-mapped .npy."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, row_length))
    buffer, cursor = TokenBuffer(row_length), 0
    for table in tokenized.select(documents).with_format("arrow").iter(batch_size=1024):
        ids = table["ids"].combine_chunks()
        buffer.add(join_documents(ids.flatten().to_numpy(), ids.value_lengths().to_numpy(), eos_id))
        count = buffer.full_rows()
        out[cursor:cursor + count] = buffer.take(count)
        cursor += count
    out.flush()


def _holds_out_by_text(cfg: JobConfig, corpus: Corpus) -> bool:
    """Whether validation documents are chosen by the seeded hash of their text (data/split.py): for streams, and
    for mixtures, whose repeated documents must all land on the side their first copy did."""
    return cfg.data.streaming or isinstance(corpus, Mixture)


def _split(cfg: JobConfig, corpus: Corpus, dataset: Dataset, nonempty: np.ndarray) -> dict[str, np.ndarray]:
    """The training and validation documents among the non-empty ones (indices into `dataset`)."""
    fraction, seed = cfg.data.validation_fraction, cfg.train.seed
    if _holds_out_by_text(cfg, corpus):
        held_out = held_out_by_text(dataset, corpus.text_column, fraction, seed)[nonempty]
        return {"train": nonempty[~held_out], "validation": nonempty[held_out]}
    train, validation = split_documents(nonempty, fraction, seed)
    return {"train": train, "validation": validation}


def _documents_by_source(corpus: Corpus, tokenized: Dataset, documents: dict[str, np.ndarray]) -> dict[str, Any]:
    """A mixture's realised shares: how many of each split's documents came from each source (nothing for one
    source)."""
    if not isinstance(corpus, Mixture):
        return {}
    sources = tokenized.data.column(SOURCE).to_numpy()
    return {"num_documents_by_source": {split: np.bincount(sources[docs], minlength=len(corpus.sources)).tolist()
                                        for split, docs in documents.items()}}


def _prepare_packed(cfg: JobConfig, corpus: Corpus, dataset: Dataset, tokenizer: Tokenizer,
                    staging: Path) -> dict[str, Any]:
    """Tokenize, split by document, pack both splits into staging; returns the manifest's counts."""
    data, row_length = cfg.data, cfg.model.seq_length + 1
    with _progress_bars(len(dataset) >= PROGRESS_BAR_DOCUMENTS):
        tokenized = dataset.map(_tokenize, batched=True, batch_size=1000,
                                remove_columns=[c for c in dataset.column_names if c != SOURCE],  # a mixture's stays
                                fn_kwargs={"tokenizer": tokenizer, "column": corpus.text_column},
                                num_proc=data.num_proc if data.num_proc > 1 else None, desc="tokenizing")
    lengths = np.asarray(tokenized.data.column("length").to_numpy(), dtype=np.int64)
    nonempty = np.flatnonzero(lengths)
    if len(nonempty) == 0:
        raise ConfigError(f"{corpus.label}: every document (text column {corpus.text_column!r}) is empty")
    if len(nonempty) < 2:
        raise ConfigError(f"{corpus.label} has one non-empty document; a validation split (data.validation_fraction) "
                          "needs at least two")
    documents = _split(cfg, corpus, dataset, nonempty)
    tokens = {split: int(lengths[docs].sum() + len(docs)) for split, docs in documents.items()}
    rows = {split: count // row_length for split, count in tokens.items()}
    _check_sizes(cfg, corpus.label, rows["train"], rows["validation"])
    dtype = token_dtype(tokenizer.vocab_size)
    for split, docs in documents.items():
        _write_rows(tokenized, docs, rows[split], tokenizer.eos_id, row_length, dtype, staging / f"{split}.npy")
    return {"num_documents": {s: len(d) for s, d in documents.items()}, "num_tokens": tokens,
            "num_sequences": rows, **_documents_by_source(corpus, tokenized, documents)}


def _prepare_streaming(cfg: JobConfig, corpus: Corpus, tokenizer: Tokenizer, num_rows: int,
                       staging: Path) -> dict[str, Any]:
    """Collect the first held-out rows of the stream (training is packed on the fly by the workers)."""
    rows = validation_rows(corpus, tokenizer, cfg.model.seq_length, cfg.data.validation_fraction, cfg.train.seed,
                           num_rows)
    _check_sizes(cfg, corpus.label, None, len(rows))
    np.save(staging / "validation.npy", rows.astype(token_dtype(tokenizer.vocab_size)))
    return {"num_sequences": {"train": None, "validation": len(rows)}}


def prepare_data(cfg: JobConfig, cache_dir: str | Path) -> PreparedData:
    """Validate `data.*`, then tokenize, split and pack into `cache_dir` once (reused while the inputs match)."""
    data = cfg.data
    corpus = resolve_corpus(data, cfg.train.seed)  # every source of a mixture, before any is read
    tokenizer = load_tokenizer(data.tokenizer)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
        if cfg.model.init_from:
            raise ConfigError(f"data.tokenizer={data.tokenizer!r} has {tokenizer.vocab_size} ids, more than the "
                              f"{cfg.model.vocab_size} embedding rows of model.init_from={cfg.model.init_from!r}; "
                              "leave data.tokenizer unset to use the source's own tokenizer")
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than data.tokenizer="
                          f"{data.tokenizer!r}'s {tokenizer.vocab_size} ids; leave it unset (null) or raise it")
    streamed_validation_rows = max(1, cfg.train.eval_batches) * cfg.train.micro_batch_size * cfg.parallel.dp
    dataset = None
    if data.streaming:
        corpus.check_stream()
    else:
        with _progress_bars(False):  # reading local files into datasets' cache: seconds, and a bar per file
            dataset = corpus.load()
    identity = {
        "format": FORMAT, "source": corpus.to_dict(), "fingerprint": corpus.fingerprint(dataset),
        "tokenizer": hashlib.sha256(tokenizer.to_json().encode()).hexdigest(), "seq_length": cfg.model.seq_length,
        "validation_fraction": data.validation_fraction, "seed": cfg.train.seed, "streaming": data.streaming,
    }
    if data.streaming:
        identity["validation_rows"] = streamed_validation_rows
    if _holds_out_by_text(cfg, corpus):
        identity["held_out_by"] = "text"  # the seeded hash of a document's text (data/split.py)
    key = cache_key(identity)
    directory = Path(cache_dir) / key
    manifest = read_manifest(directory)
    if manifest is not None and manifest["identity"] == identity:
        counts = manifest["num_sequences"]
        _check_sizes(cfg, corpus.label, counts["train"], counts["validation"])
        return PreparedData(directory, manifest)
    staging = staging_directory(Path(cache_dir), key)
    try:
        if data.streaming:
            counts = _prepare_streaming(cfg, corpus, tokenizer, streamed_validation_rows, staging)
        else:
            counts = _prepare_packed(cfg, corpus, dataset, tokenizer, staging)
        (staging / TOKENIZER_FILE).write_text(tokenizer.to_json())
        manifest = {
            "format": FORMAT, "key": key, "identity": identity, "source": corpus.to_dict(),
            "tokenizer": data.tokenizer, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "seq_length": cfg.model.seq_length, "seed": cfg.train.seed,
            "validation_fraction": data.validation_fraction, "streaming": data.streaming,
            "dtype": token_dtype(tokenizer.vocab_size).name, **counts,
        }
        publish(staging, directory, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(directory, manifest)
