"""The prepared-data cache: one directory per content identity, a JSON manifest written last."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
