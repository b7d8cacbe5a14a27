"""Where a run's files live: a local directory or a URI (s3://, gs://, hdfs://), through pyarrow.fs.

pyarrow.fs is the layer Ray Train resolves `storage_path` with, so a URI means the same store, with
the same credentials and options (`?endpoint_override=...`), to Ray's uploads and to our catalog.
No maintained library gives pathlib's interface over pyarrow.fs (universal_pathlib wraps fsspec,
which configures credentials and endpoints its own way), hence this small one.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union
from urllib.parse import urlsplit

import pyarrow.fs as pafs

SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(text: str) -> bool:
    """Whether `text` names a filesystem by scheme (`file://` included), not a plain path."""
    return SCHEME.match(text) is not None


@dataclass(frozen=True)
class Location:
    """A file or directory on a pyarrow filesystem; `str()` gives what `locate` opens again (a path or a URI)."""

    fs: pafs.FileSystem
    path: str  # the filesystem's own path: no scheme, no options
    scheme: str = ""  # "" on the local filesystem
    query: str = ""  # the URI's options, kept so that str() opens the same store in another process

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local(self) -> Path:
        """The local path (only for a local location)."""
        if not self.is_local:
            raise ValueError(f"{self} is not on the local filesystem")
        return Path(self.path)

    def __str__(self) -> str:
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", self.scheme, self.query)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0] or "/", self.scheme, self.query)

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def size(self) -> int:
        """A file's size in bytes (0 when it does not exist)."""
        info = self.info()
        return info.size if info.type == pafs.FileType.File else 0

    def children(self) -> list[Location]:
        """What a directory holds (none when it does not exist), by name."""
        listed = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((self / Path(info.path).name for info in listed), key=lambda loc: loc.name)

    def files(self) -> dict[str, pafs.FileInfo]:
        """Every file under a directory, by path relative to it."""
        listed = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=True))
        base = self.path.rstrip("/") + "/"
        return {info.path[len(base):]: info for info in listed if info.type == pafs.FileType.File}

    def mtime(self) -> float:
        """When it was last written; an object store's directory (a prefix) has no time of its own, so the newest
        of its files."""
        info = self.info()
        if info.mtime_ns is not None:
            return info.mtime_ns / 1e9
        times = [f.mtime_ns for f in self.files().values() if f.mtime_ns is not None]
        return max(times) / 1e9 if times else 0.0

    def open_input(self) -> pafs.NativeFile:
        return self.fs.open_input_stream(self.path)

    def read_text(self) -> str:
        with self.open_input() as stream:
            return stream.read().decode()

    def write_text(self, text: str) -> None:
        """Write a whole file at once: atomically (a reader sees the old file or the new one, never half)."""
        if self.is_local:  # an object store's single upload is already atomic; a local file needs the rename
            self.local.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.local.parent, prefix=f".{self.name}.", delete=False) as out:
                out.write(text)
            os.replace(out.name, self.path)
            return
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(text.encode())

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def remove(self) -> None:
        """Delete a file or a whole directory."""
        if self.is_dir():
            self.fs.delete_dir(self.path)
        else:
            self.fs.delete_file(self.path)

    def move_to(self, target: Location) -> None:
        """Rename, on a local filesystem; an object store has no renames, so copy everything, then delete."""
        if self.is_local:
            self.fs.move(self.path, target.path)
            return
        pafs.copy_files(self.path, target.path, source_filesystem=self.fs, destination_filesystem=target.fs)
        self.remove()

    def download(self, local: Path) -> None:
        """Copy a file or directory here to a local path."""
        (local if self.is_dir() else local.parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

    def upload(self, local: Path) -> None:
        """Copy a local file or directory to here."""
        pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)


Where = Union[str, Path, Location]


def local_cache() -> Path:
    """This machine's cache for copies out of object stores ($XDG_CACHE_HOME/mor-dist, default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mor-dist"


def locate(where: Where) -> Location:
    """A location from a local path, a `file://` URI or any URI pyarrow opens (its options kept)."""
    if isinstance(where, Location):
        return where
    text = str(where)
    if not is_uri(text):
        return Location(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
    fs, path = pafs.FileSystem.from_uri(text)
    if fs.type_name == "local":
        return Location(fs, str(Path(path).resolve()))
    parts = urlsplit(text)
    return Location(fs, path.rstrip("/"), parts.scheme, parts.query)

