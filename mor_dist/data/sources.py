"""Where documents come from: the bundled corpus, local txt/jsonl/json/parquet files, or a hub dataset."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset, load_dataset

from mor_dist.config import DataConfig
from mor_dist.errors import ConfigError
from mor_dist.hub import require_hub

BUNDLED_CORPUS = Path(__file__).resolve().parent / "bundled" / "corpus"
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LOCAL_BUILDERS = frozenset(BUILDERS.values())


@dataclass(frozen=True)
class Source:
    """A resolved `data.dataset`: a `datasets` builder with local files, or a hub dataset name."""

    spec: str  # data.dataset as written
    builder: str  # "text" | "json" | "parquet" for local files, else the hub name
    data_files: tuple[str, ...]
    config_name: str | None
    split: str
    text_column: str
    key: str = "data"  # the config section that names it ("data.mixture[1]"), for messages; not stored

    @property
    def is_local(self) -> bool:
        """Local files (read with a builder) rather than a hub dataset."""
        return self.builder in LOCAL_BUILDERS and bool(self.data_files)

    @property
    def label(self) -> str:
        """How messages name it: the config key and its value."""
        return f"{self.key}.dataset={self.spec!r}"

    @property
    def name(self) -> str:
        """How summaries name it: the dataset as written (a file's name for local paths)."""
        return Path(self.spec).name if self.data_files and self.spec != "bundled" else self.spec

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for the cache manifest)."""
        values = {k: v for k, v in asdict(self).items() if k != "key"}  # the key only words messages
        return {**values, "data_files": list(self.data_files)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Source:
        """Inverse of `to_dict`."""
        return cls(**{**values, "data_files": tuple(values["data_files"])})

    def _load(self, streaming: bool) -> Dataset | IterableDataset:
        """`datasets.load_dataset` for this source."""
        if self.is_local:
            extra = {"sample_by": "paragraph"} if self.builder == "text" else {}
            return load_dataset(self.builder, data_files=list(self.data_files), split="train",
                                streaming=streaming, **extra)
        require_hub(f"{self.key}.dataset", self.spec)
        return load_dataset(self.builder, self.config_name, split=self.split, streaming=streaming)

    def load(self) -> Dataset:
        """The whole dataset, checked: readable, not empty, with a string `data.text_column`."""
        try:
            dataset = self._load(streaming=False)
        except ConfigError:
            raise
        except Exception as err:  # datasets raises many types (DatasetGenerationError, FileNotFoundError, ...)
            raise _unreadable(self, err) from err
        if len(dataset) == 0:
            raise ConfigError(f"{self.label} holds no records; point it at a non-empty dataset")
        if self.text_column not in dataset.column_names:
            raise _missing_column(self, dataset.column_names)
        dtype = getattr(dataset.features[self.text_column], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise ConfigError(f"{self.key}.text_column={self.text_column!r} of {self.label} holds "
                              f"{dataset.features[self.text_column]}, not text; choose a string column")
        return dataset

    def stream(self) -> IterableDataset:
        """The dataset as a lazily read stream."""
        try:
            return self._load(streaming=True)
        except ConfigError:
            raise
        except Exception as err:
            raise _unreadable(self, err) from err

    def check_stream(self) -> None:
        """Check a stream's first record: present, with a string `data.text_column`."""
        try:
            first = next(iter(self.stream()), None)
        except ConfigError:
            raise
        except Exception as err:
            raise _unreadable(self, err) from err
        if first is None:
            raise ConfigError(f"{self.label} holds no records; point it at a non-empty dataset")
        if self.text_column not in first:
            raise _missing_column(self, list(first))
        if not isinstance(first[self.text_column], str):
            raise ConfigError(f"{self.key}.text_column={self.text_column!r} of {self.label} does not hold text; "
                              "choose a string column")

    def fingerprint(self, dataset: Dataset | None) -> str:
        """Content hash of local files; `datasets`' own fingerprint (or just the name) for hub data."""
        if not self.is_local:
            return dataset._fingerprint if dataset is not None else f"{self.builder}:{self.config_name}:{self.split}"
        digest = hashlib.sha256()
        for name in self.data_files:
            digest.update(name.encode() + b"\0")
            with open(name, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()


def _innermost(err: BaseException) -> BaseException:
    """The root of an exception chain (`datasets` wraps the parser's error in a generic one)."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    return err


def _bad_json_line(files: tuple[str, ...]) -> str | None:
    """`file line N: error` for the first line of a .jsonl file that is not one JSON object, else None."""
    for name in files:
        if not name.lower().removesuffix(".gz").endswith(".jsonl"):
            continue
        with (gzip.open if name.endswith(".gz") else open)(name, "rt", encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    return f"{name} line {number} is not valid JSON ({err})"
                if not isinstance(record, dict):
                    return f"{name} line {number} is not a JSON object"
    return None


def _unreadable(source: Source, err: Exception) -> ConfigError:
    """The error for data that `datasets` could not load: the bad record's file and line where it can be found,
    else the underlying cause."""
    located = _bad_json_line(source.data_files) if source.builder == "json" else None
    root = _innermost(err)
    detail = located or f"{type(root).__name__}: {root}"
    return ConfigError(f"{source.label} could not be read: {detail}; fix the data, or check the files (txt, "
                       f"jsonl/json, parquet) or the hub name, {source.key}.dataset_config and {source.key}.split")


def _missing_column(source: Source, columns: list[str]) -> ConfigError:
    """The error for a `data.text_column` the data does not have."""
    return ConfigError(f"{source.key}.text_column={source.text_column!r} is not a column of {source.label}; "
                       f"its columns are {columns}")


def _builder_of(path: Path) -> str | None:
    """The `datasets` builder for a file name (compressed .gz allowed), None if not a data file."""
    name = path.name.lower().removesuffix(".gz")
    return next((builder for suffix, builder in BUILDERS.items() if name.endswith(suffix)), None)


def _local_source(spec: str, files: list[Path], data: DataConfig, key: str) -> Source:
    """A Source over local files, all of one kind and not all empty."""
    builders = {_builder_of(f) for f in files}
    if None in builders or len(builders) != 1:
        kinds = sorted(f.name for f in files if _builder_of(f) is None) or sorted(b for b in builders if b)
        raise ConfigError(f"{key}.dataset={spec!r} must be files of one kind (.txt, .jsonl/.json or .parquet, "
                          f"optionally .gz); found {kinds}")
    if all(f.stat().st_size == 0 for f in files):
        raise ConfigError(f"{key}.dataset={spec!r} is empty; point it at files that hold documents")
    return Source(spec=spec, builder=builders.pop(), data_files=tuple(str(f) for f in files), config_name=None,
                  split="train", text_column=data.text_column, key=key)


def resolve_source(data: DataConfig, key: str = "data") -> Source:
    """Turn `data.dataset` into a Source, rejecting missing or unusable local paths by name (`key`: the config
    section the settings came from, for messages)."""
    spec = data.dataset
    if spec == "bundled":
        return _local_source(spec, sorted(BUNDLED_CORPUS.glob("*.jsonl.gz")), data, key)
    path = Path(spec).expanduser()
    if path.is_file():
        return _local_source(spec, [path.resolve()], data, key)
    if path.is_dir():
        files = sorted(f.resolve() for f in path.rglob("*")
                       if f.is_file() and not f.name.startswith(".") and _builder_of(f) is not None)
        if not files:
            raise ConfigError(f"{key}.dataset={spec!r} is a directory without .txt, .jsonl/.json or .parquet files")
        return _local_source(spec, files, data, key)
    if spec.startswith(("/", "./", "../", "~")) or _builder_of(path) is not None:
        raise ConfigError(f"{key}.dataset={spec!r} does not exist; give an existing file or directory, "
                          "a Hugging Face hub dataset name, or 'bundled'")
    return Source(spec=spec, builder=spec, data_files=(), config_name=data.dataset_config, split=data.split,
                  text_column=data.text_column, key=key)
