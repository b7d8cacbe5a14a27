"""The prepared-data cache: one directory per content identity, a JSON manifest written last.

With run.storage_path in an object store the driver prepares into a node-local cache and uploads the
entry to `<storage>/cache/` (manifest last); each node downloads it once into its own local cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mor_dist.location import Location, local_cache, locate

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the layout or the packing rule changes


def cache_key(identity: dict[str, Any]) -> str:
    """Short stable hash of everything that determines the prepared arrays."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache entry, or None if there is none (or it is unreadable)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def staging_directory(root: Path, key: str) -> Path:
    """A fresh temporary directory next to the final entry, to be filled and then published."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))


def publish(staging: Path, directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into `staging` and move it to `directory`, replacing a stale entry."""
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def cache_root(storage: Location) -> Path:
    """Where the driver prepares data: beside the runs on a filesystem, else this node's own cache."""
    if storage.is_local:
        return storage.local / "cache"
    return local_cache() / "data"


def share(entry: Path, storage: Location) -> str:
    """Where the workers find a prepared entry: the entry itself on a filesystem; in an object store, its copy
    under `<storage>/cache/` (uploaded once, manifest last, so a half-uploaded copy is never taken as whole)."""
    if storage.is_local:
        return str(entry)
    remote = storage / "cache" / entry.name
    if not (remote / MANIFEST).is_file():
        for item in sorted(entry.iterdir(), key=lambda p: p.name == MANIFEST):
            (remote / item.name).upload(item)
    return str(remote)


def fetch(where: str) -> Path:
    """A prepared entry on this node: the directory itself, or a copy downloaded once into the local cache (the
    node's workers share it)."""
    source = locate(where)
    return source.local if source.is_local else source.copy_once(cache_root(source.parent.parent) / source.name)
