"""The run directory's own files (metrics.jsonl, the launch marker, config.yaml, validation/) for the logging rank.

On a filesystem they are written in place. An object store has no appends, so the logging rank works
in a local copy: pulled when it starts, published after each checkpoint (the files then match what a
restart resumes from; later steps are replayed) and when training ends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mor_dist.location import Location

METRICS_FILE = "metrics.jsonl"
REPLACED_FILE = "metrics.replaced.jsonl"
LAUNCH_FILE = "launch"  # the id of the launch that last logged into the run directory
RUN_CONFIG_FILE = "config.yaml"
VALIDATION_DIR = "validation"
OWN_FILES = (METRICS_FILE, REPLACED_FILE, LAUNCH_FILE, RUN_CONFIG_FILE, VALIDATION_DIR)


class RunFiles:
    """Where the tracker writes (`local`), and how those files reach the run directory."""

    def __init__(self, run_dir: Location, scratch: Path) -> None:
        """`scratch`: the local copy's folder when the run directory is in an object store."""
        self.run_dir = run_dir
        self.local = run_dir.local if run_dir.is_local else scratch
        self._published: dict[str, tuple[int, int]] = {}

    def pull(self) -> Path:
        """The run's files as the run directory holds them, in `local` (which it returns)."""
        if self.run_dir.is_local:
            return self.local
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for item in self.run_dir.children():
            if item.name in OWN_FILES:
                item.download(self.local / item.name)
        self._published = self._stamps()
        return self.local

    def publish(self) -> None:
        """Upload what changed since the last pull or publish."""
        if self.run_dir.is_local:
            return
        stamps = self._stamps()
        for rel, stamp in stamps.items():
            if self._published.get(rel) != stamp:
                (self.run_dir / rel).upload(self.local / rel)
        self._published = stamps

    def close(self) -> None:
        """Publish, then remove the local copy."""
        self.publish()
        if not self.run_dir.is_local:
            shutil.rmtree(self.local, ignore_errors=True)

    def _stamps(self) -> dict[str, tuple[int, int]]:
        found = (p for p in self.local.rglob("*") if p.is_file())
        return {str(p.relative_to(self.local)): (p.stat().st_size, p.stat().st_mtime_ns) for p in found}
