"""Where a run's files live: a local directory or a URI (s3://, gs://, hdfs://), through pyarrow.fs.

pyarrow.fs is the layer Ray Train resolves `storage_path` with, so a URI means the same store, with
the same credentials and options (`?endpoint_override=...`), to Ray's uploads and to our catalog.
No maintained library gives pathlib's interface over pyarrow.fs (universal_pathlib wraps fsspec,
which configures credentials and endpoints its own way), hence this small one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from mor_dist.errors import ConfigError

SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# Object stores whose pyarrow path is the whole address (`s3://bucket/key` <-> path `bucket/key`), so that a
# location's string opens the same place in another process; hdfs:// and abfs:// keep a host or account aside.
OBJECT_STORES = ("s3", "gs", "gcs")


def uri_scheme(text: str) -> str | None:
    """The scheme of a URI (`s3`, `file`, ...), None for a plain path."""
    found = SCHEME.match(text)
    return found.group(1).lower() if found else None


def is_uri(text: str) -> bool:
    """Whether `text` names a filesystem by scheme (`file://` included), not a plain path."""
    return uri_scheme(text) is not None


def check_uri(text: str) -> None:
    """Refuse a URI we cannot carry to other processes intact: another scheme, or credentials in it (they would be
    printed, logged to MLflow and stored in every checkpoint)."""
    scheme = uri_scheme(text)
    if scheme is None or scheme == "file":
        return
    if "@" in urlsplit(text).netloc:  # checked first: the message must not repeat them
        raise ConfigError(f"{scheme}://...@...: credentials do not belong in the URI (it is printed and logged); give "
                          "them by environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) "
                          "or the platform's identity")
    if scheme not in OBJECT_STORES:
        raise ConfigError(f"{text}: {scheme}:// is not supported; give a directory (a shared volume: NFS, a "
                          f"PersistentVolumeClaim) or a URI of {', '.join(s + '://' for s in OBJECT_STORES)}")


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

    @property
    def identity(self) -> tuple[str, str]:
        """What it is, however it was written: the real path (symlinks followed) of a local location; scheme and
        path in an object store (the URI's options only say how to reach it)."""
        return (self.scheme, self.path if self.scheme else os.path.realpath(self.path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self.identity == other.identity

    def __hash__(self) -> int:
        return hash(self.identity)

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

    def _listing(self, recursive: bool) -> list[pafs.FileInfo]:
        """What is under a directory; nothing when it does not exist or is a file."""
        try:
            return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive))
        except NotADirectoryError:
            return []

    def children(self, directories: bool = False) -> list[Location]:
        """What a directory holds (none when it does not exist; only its subdirectories with `directories`), by name,
        from one listing."""
        listed = [i for i in self._listing(False) if not directories or i.type == pafs.FileType.Directory]
        return sorted((self / Path(info.path).name for info in listed), key=lambda loc: loc.name)

    def files(self) -> dict[str, pafs.FileInfo]:
        """Every file under a directory, by path relative to it."""
        listed = self._listing(True)
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
        """Delete a file or a whole directory (not through a local symlink: what it points to is not ours)."""
        if self.is_local and os.path.islink(self.path):
            raise IsADirectoryError(f"{self.path} is a symlink; not deleted")
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

    def copy_once(self, target: Path) -> Path:
        """This directory on this machine at `target`, downloaded once: concurrent callers (a node's workers) wait on
        a file lock and reuse it, and a copy appears only whole (downloaded beside it, then renamed). Ray's
        Checkpoint.as_directory would download once per worker: its temporary folder is per object."""
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{target.name}.lock")):
            if not target.is_dir():
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
                try:
                    self.download(staging)
                    staging.rename(target)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        return target


Where = Union[str, Path, Location]


def local_cache() -> Path:
    """This machine's cache for copies out of object stores ($XDG_CACHE_HOME/mor-dist, default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mor-dist"


def locate(where: Where) -> Location:
    """A location from a local path, a `file://` URI or an object store's URI (its options kept)."""
    if isinstance(where, Location):
        return where
    text = str(where)
    if not is_uri(text):  # absolute, symlinks kept: a run directory's parent stays the storage it was named under
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))
    check_uri(text)
    fs, path = pafs.FileSystem.from_uri(text)
    if fs.type_name == "local":
        return Location(fs, os.path.abspath(path))
    parts = urlsplit(text)
    return Location(fs, path.rstrip("/"), parts.scheme.lower(), parts.query)

