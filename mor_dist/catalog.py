"""The checkpoints of a run directory: which are whole, which to resume from, which retention may delete.

File operations only (no torch), so the driver, Ray Train's controller and rank 0 share them; they go
through `location`, so a run directory may be local or in an object store (s3://...). Every
rank of a checkpoint writes its shards, then a manifest of what it wrote (sizes and CRC32s). A
checkpoint is whole when the manifests of all its ranks are present and every listed file matches;
it is partial when a rank did not finish writing, damaged when a listed file is missing, truncated
or corrupted, and unreadable when storage keeps failing to read it (retried first, never taken for
corruption).
"""

from __future__ import annotations

import enum
import errno
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from mor_dist.errors import ConfigError
from mor_dist.location import Location, Where, local_cache, locate

MANIFEST = "manifest.rank{}.json"
KEEP = "KEEP"  # a file in a checkpoint directory that retention respects; it holds the reason
READ_TRIES = 3
BLOCK = 1 << 22


class Status(str, enum.Enum):
    """What a checkpoint directory holds."""

    WHOLE = "whole"
    PARTIAL = "partial"
    DAMAGED = "damaged"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint directory, as inspected."""

    path: Location
    status: Status
    problem: Optional[str]  # why it is not whole (None when whole)
    step: Optional[int]  # from rank 0's manifest, when readable
    saved_at: float  # when rank 0 finished writing it (its manifest), else the directory's mtime
    launch: Optional[str]  # the launch that wrote it (None for checkpoints of older versions)

    @property
    def describe(self) -> str:
        """e.g. `checkpoint_... (step 6): corrupted ...`."""
        step = f" (step {self.step})" if self.step is not None else ""
        return f"{self.path.name}{step}: {self.problem or 'whole'}"


class ReadFailed(OSError):
    """Storage failed to read a file READ_TRIES times."""


def _retrying(read: Callable[[], Any], path: Location, warn: Callable[[str], None]) -> Any:
    """read(), retried with backoff on I/O errors other than a missing file (storage can fail transiently)."""
    for attempt in range(READ_TRIES):
        try:
            return read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as err:
            if attempt == READ_TRIES - 1:
                raise ReadFailed(err.errno or errno.EIO, f"{path}: {err.strerror or err} ({READ_TRIES} tries)") from err
            warn(f"warning: reading {path} failed ({err}); retrying")
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def checksum(path: Where) -> tuple[int, int]:
    """(size, CRC32) of a file, read in blocks."""
    size, crc = 0, 0
    with locate(path).open_input() as handle:
        while block := handle.read(BLOCK):
            size += len(block)
            crc = zlib.crc32(block, crc)
    return size, crc


def file_entries(directory: Path, skip: set[str]) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of the files under `directory` (manifests and `skip` left out)."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_file() and rel not in skip and not rel.startswith("manifest.") and rel != KEEP:
            entries[rel] = list(checksum(path))
    return entries


def write_manifest(directory: Path, rank: int, manifest: dict[str, Any]) -> None:
    """Rank's manifest, written atomically (a half-written manifest never exists)."""
    final = directory / MANIFEST.format(rank)
    partial = final.with_suffix(".tmp")
    partial.write_text(json.dumps(manifest))
    os.replace(partial, final)


def read_manifest(directory: Where, rank: int = 0, warn: Callable[[str], None] = print) -> dict[str, Any]:
    """A rank's manifest (default rank 0: step, world size, MLflow run id, run config, padded vocabulary, files)."""
    path = locate(directory) / MANIFEST.format(rank)
    return json.loads(_retrying(path.read_text, path, warn))


def _damaged(directory: Location, manifest: dict[str, Any], problem: str) -> Checkpoint:
    return Checkpoint(directory, Status.DAMAGED, problem, manifest.get("step"),
                      manifest.get("saved_at", 0.0), manifest.get("launch"))


def inspect(directory: Where, warn: Callable[[str], None] = print, deep: bool = True) -> Checkpoint:
    """Classify a checkpoint directory; deep=False checks only that every rank's manifest is there."""
    directory = locate(directory)

    def written() -> float:  # only without rank 0's saved_at: in an object store it lists the directory's files
        return directory.mtime() if directory.exists() else 0.0

    first = directory / MANIFEST.format(0)
    present = directory.files()  # one listing: in an object store a request per file would add up
    head: dict[str, Any] = {}
    try:
        if first.name not in present:
            return Checkpoint(directory, Status.PARTIAL, f"no {first.name}: it was not completely written",
                              None, written(), None)
        try:
            head = read_manifest(directory, 0, warn)
        except ValueError as err:
            return Checkpoint(directory, Status.DAMAGED, f"{first.name} is not valid JSON ({err})", None, written(),
                              None)
        if "saved_at" not in head:
            head["saved_at"] = written()
        for rank in range(head.get("world_size", 1)):
            if MANIFEST.format(rank) not in present:
                return Checkpoint(directory, Status.PARTIAL, f"lacks {MANIFEST.format(rank)}: rank {rank} did not "
                                  "finish writing", head.get("step"), head["saved_at"], head.get("launch"))
        if not deep:
            return Checkpoint(directory, Status.WHOLE, None, head.get("step"), head["saved_at"], head.get("launch"))
        for rank in range(head.get("world_size", 1)):
            try:
                files = read_manifest(directory, rank, warn)["files"] if rank else head["files"]
            except (ValueError, KeyError) as err:
                return _damaged(directory, head, f"{MANIFEST.format(rank)} is unreadable ({err!r})")
            for rel, (size, crc) in files.items():
                file = directory / rel
                if rel not in present:
                    return _damaged(directory, head, f"{rel} is missing")
                have_size, have_crc = _retrying(lambda: checksum(file), file, warn)
                if have_size != size:
                    return _damaged(directory, head, f"{rel} is truncated ({have_size} of {size} bytes)")
                if have_crc != crc:
                    return _damaged(directory, head, f"{rel} is corrupted (checksum mismatch)")
        return Checkpoint(directory, Status.WHOLE, None, head.get("step"), head["saved_at"], head.get("launch"))
    except ReadFailed as err:
        return Checkpoint(directory, Status.UNREADABLE, f"storage could not read it ({err.strerror}); it is kept, "
                          "try again when the storage recovers", head.get("step"), head.get("saved_at") or written(),
                          head.get("launch"))


def checkpoint_dirs(run_dir: Where) -> list[Location]:
    """The `checkpoint_*` directories of a run directory."""
    return [d for d in locate(run_dir).children(directories=True) if d.name.startswith("checkpoint_")]


def survey(run_dir: Where, deep: bool = False, warn: Callable[[str], None] = print) -> list[Checkpoint]:
    """Every checkpoint of a run directory, newest first (by when it was written)."""
    found = [inspect(d, warn, deep) for d in checkpoint_dirs(run_dir)]
    return sorted(found, key=lambda c: (c.saved_at, c.path.name), reverse=True)


def newest_whole(run_dir: Where, warn: Callable[[str], None] = print, launch: Optional[str] = None,
                 ) -> Optional[Checkpoint]:
    """The most recently written whole checkpoint (of one launch, if given), verified newest first.

    Each candidate is read once; damaged and unreadable ones met on the way are reported and marked
    so that retention keeps them as evidence.
    """
    for candidate in survey(run_dir, deep=False, warn=warn):
        if candidate.status is not Status.WHOLE or (launch is not None and candidate.launch != launch):
            continue
        checked = inspect(candidate.path, warn)
        if checked.status is Status.WHOLE:
            return checked
        warn(f"warning: skipping {checked.path}: {checked.problem}")
        keep(checked.path, f"{checked.status.value}: {checked.problem}")
    return None


def keep(directory: Where, reason: str) -> None:
    """Exempt a checkpoint from retention (best effort: the storage may be read-only or failing)."""
    try:
        (locate(directory) / KEEP).write_text(reason + "\n")
    except OSError:
        pass


def prune(run_dir: Where, keep_newest: int, protect: Iterable[Where] = (), since: Optional[float] = None,
          ) -> list[Location]:
    """Retention: delete whole checkpoints beyond the newest `keep_newest`, and partial ones that are older
    than the newest whole one or were left since `since` (the current launch's start: its writers are gone).

    Never deletes a protected checkpoint or one holding a KEEP file (damaged, or resumed from
    explicitly). Decided from the manifests alone (no shard is read). Returns what went.
    """
    protected = {locate(p) for p in protect}
    listed = survey(run_dir)
    whole = [c for c in listed if c.status is Status.WHOLE]
    newest = whole[0].saved_at if whole else float("-inf")
    doomed = whole[keep_newest:] + [c for c in listed if c.status is Status.PARTIAL and (
        c.saved_at < newest or (since is not None and c.saved_at >= since))]
    removed = []
    for entry in doomed:
        if entry.path in protected or (entry.path / KEEP).exists():
            continue
        try:
            entry.path.remove()
        except OSError:
            continue  # retention tries again after the next checkpoint
        removed.append(entry.path)
    return removed


def not_a_checkpoint(directory: Where) -> Optional[str]:
    """Why a path given as a checkpoint is not one (a file, a run directory), else None."""
    directory = locate(directory)
    if not directory.is_dir():
        return f"{directory} is not a checkpoint directory (runs/<name>/checkpoint_<date>_<time>/)"
    if not (directory / MANIFEST.format(0)).is_file() and checkpoint_dirs(directory):
        inside = newest_whole(directory, warn=lambda _: None)
        where = f"; its newest checkpoint is {inside.path}" if inside else ""
        return f"{directory} is a run directory, not a checkpoint{where}"
    return None


def verify(directory: Where, warn: Callable[[str], None] = print) -> Optional[str]:
    """None when `directory` is a whole checkpoint, else why not."""
    problem = not_a_checkpoint(directory)
    if problem is not None:
        return problem
    checked = inspect(directory, warn)
    return None if checked.status is Status.WHOLE else f"{directory}: {checked.problem}"


def resolve_checkpoint(path: Where, warn: Callable[[str], None] = print) -> Path:
    """A checkpoint directory given directly, or a run directory's newest whole checkpoint (said on `warn`), on this
    machine: from an object store it is verified and downloaded once into the local cache."""
    path = locate(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; give a run directory (runs/<name>) or one of its "
                          "checkpoint_* directories")
    if checkpoint_dirs(path):
        found = newest_whole(path, warn)
        if found is None:
            raise ConfigError(f"{path} has no whole checkpoint: {[c.describe for c in survey(path, warn=warn)]}")
        warn(f"using {found.path} (step {found.step}), the newest whole checkpoint of {path}")
        path = found.path
    return path.local if path.is_local else _downloaded(path, warn)  # a local one is verified where it is read


def _downloaded(checkpoint: Location, warn: Callable[[str], None]) -> Path:
    """A checkpoint of an object store copied once into `<local cache>/checkpoints/<scheme>/<path>`, then verified
    there (each byte crosses the network once); a copy that is not whole is removed and refused."""
    local = checkpoint.copy_once(local_cache() / "checkpoints" / checkpoint.scheme / checkpoint.path)
    problem = verify(local, warn)
    if problem is not None:
        shutil.rmtree(local, ignore_errors=True)
        raise ConfigError(problem.replace(str(local), str(checkpoint)))
    return local
