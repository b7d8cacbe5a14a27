"""Weighted dataset mixtures (`data.mixture`): several sources interleaved by weight into one document stream with
`datasets.interleave_datasets`, for cached (map-style) and streamed data alike."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from datasets import Dataset, Features, IterableDataset, Value, interleave_datasets

from mor_dist.config import DataConfig, MixtureEntry
from mor_dist.data.sources import Source, resolve_source

TEXT = "text"  # every source's text column is renamed to this before interleaving
SOURCE = "source"  # cached mixtures: the entry a document was drawn from, for the per-source counts
# Megatron's blended datasets draw each sample's source by weight and repeat the smaller sources to honour the
# weights. "all_exhausted" does the same: a source that runs out starts over until every source has been read once.
# "first_exhausted" would stop at the first source to run out and silently drop the rest of the larger ones;
# "all_exhausted_without_replacement" would finish on the larger sources alone, away from the weights.
STOPPING_STRATEGY = "all_exhausted"

Documents = TypeVar("Documents", Dataset, IterableDataset)


def entry_key(index: int) -> str:
    """The config section of a mixture entry, as messages name it."""
    return f"data.mixture[{index}]"


def _entry_data(data: DataConfig, entry: MixtureEntry) -> DataConfig:
    """The data section as this entry sees it: its own keys, the section's for those it leaves unset."""
    given = {k: v for k, v in dataclasses.asdict(entry).items() if v is not None and k != "weight"}
    return dataclasses.replace(data, mixture=None, **given)


def _text_only(documents: Documents, column: str) -> Documents:
    """Only the text column, renamed to TEXT and typed as string, so that the sources' columns line up."""
    documents = documents.select_columns([column])
    if column != TEXT:
        documents = documents.rename_column(column, TEXT)
    target = Features({TEXT: Value("string")})
    # Parquet may hold large_string, which interleave_datasets will not align with string; streams may not know.
    return documents if documents.features == target else documents.cast(target)


@dataclass(frozen=True)
class Mixture:
    """Sources drawn by weight (seeded), the smaller ones repeated until every source has been read once."""

    sources: tuple[Source, ...]
    weights: tuple[float, ...]  # normalised: the chance that the next document comes from each source
    seed: int  # train.seed: which source each document is drawn from
    label = "data.mixture"  # how messages name it
    text_column = TEXT

    @property
    def name(self) -> str:
        """How summaries name it: the sources' names joined."""
        return "+".join(source.name for source in self.sources)

    def load(self) -> Dataset:
        """Every source loaded and checked, interleaved; with a SOURCE column (the entry each document came from)."""
        parts = []
        for index, source in enumerate(self.sources):
            documents = _text_only(source.load(), source.text_column)
            parts.append(documents.add_column(SOURCE, np.full(len(documents), index, dtype=np.int32)))
        return self._interleave(parts)

    def stream(self) -> IterableDataset:
        """The sources streamed and interleaved (resumable through the stream's own `state_dict()`)."""
        return self._interleave([_text_only(source.stream(), source.text_column) for source in self.sources])

    def _interleave(self, parts: list[Documents]) -> Documents:
        """`datasets.interleave_datasets` with the weights, the seed and the stopping strategy."""
        return interleave_datasets(parts, probabilities=list(self.weights), seed=self.seed,
                                   stopping_strategy=STOPPING_STRATEGY)

    def check_stream(self) -> None:
        """Check each source's first record."""
        for source in self.sources:
            source.check_stream()

    def fingerprint(self, dataset: Dataset | None) -> str:
        """The sources' fingerprints (local files: content; hub data: the name, and for loaded hub data datasets'
        fingerprint of the interleaved dataset, which follows its parts')."""
        parts = [source.fingerprint(None) for source in self.sources]
        if dataset is not None and not all(source.is_local for source in self.sources):
            parts.append(dataset._fingerprint)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for the cache manifest and its identity)."""
        return {"sources": [source.to_dict() for source in self.sources], "weights": list(self.weights),
                "seed": self.seed, "stopping_strategy": STOPPING_STRATEGY}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Mixture:
        """Inverse of `to_dict`."""
        sources = tuple(Source.from_dict({**source, "key": entry_key(i)}) for i, source in enumerate(values["sources"]))
        return cls(sources, tuple(values["weights"]), values["seed"])


Corpus = Source | Mixture  # where the documents come from


def resolve_corpus(data: DataConfig, seed: int) -> Corpus:
    """`data.mixture` as a Mixture (each entry resolved like `data.dataset`), else `data.dataset`'s Source."""
    if data.mixture is None:
        return resolve_source(data)
    sources = tuple(resolve_source(_entry_data(data, entry), entry_key(i)) for i, entry in enumerate(data.mixture))
    total = sum(entry.weight for entry in data.mixture)
    return Mixture(sources, tuple(entry.weight / total for entry in data.mixture), seed)


def corpus_from_dict(values: dict[str, Any]) -> Corpus:
    """A manifest's `source`: a Mixture or a Source."""
    return Mixture.from_dict(values) if "sources" in values else Source.from_dict(values)
