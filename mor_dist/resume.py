"""Where a launch starts: an explicit checkpoint, the run's newest whole one, or step 0.

A run never starts over on top of its own outputs without being told: when checkpoints exist and
none is usable the launch stops and lists them; `--start-over` then moves the old run directory
aside and renames its MLflow run, so nothing is overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from mor_dist.config import JobConfig, state_changes
from mor_dist.errors import ConfigError
from mor_dist.catalog import (KEEP, Checkpoint, Status, checkpoint_dirs, inspect, keep, newest_whole,
                                   not_a_checkpoint, read_manifest, survey)
from mor_dist.location import Location, Where, locate
from mor_dist.tracking.run_files import METRICS_FILE

START_OVER = "--start-over"


class RunComplete(Exception):
    """The run's latest checkpoint already reached train.steps: nothing to do."""


@dataclass(frozen=True)
class Start:
    """A launch's starting point: a verified checkpoint and its manifest, or none (step 0)."""

    checkpoint: Optional[Location]
    saved: Optional[dict[str, Any]]  # rank 0's manifest of the checkpoint

    @property
    def step(self) -> int:
        return self.saved["step"] if self.saved else 0


def _explicit(path: Where) -> Checkpoint:
    """A --resume-from checkpoint, verified."""
    problem = not_a_checkpoint(path)
    if problem is None:
        checked = inspect(path)
        problem = None if checked.status is Status.WHOLE else f"{path}: {checked.problem}"
    if problem is not None:
        raise ConfigError(f"--resume-from: {problem}")
    return checked


def _none_usable(run_dir: Location, cfg: JobConfig) -> ConfigError:
    """The error for a run directory whose checkpoints are all unusable, listing each and why."""
    listed = survey(run_dir, deep=True, warn=lambda _: None)
    for entry in listed:
        if entry.status in (Status.DAMAGED, Status.UNREADABLE):
            keep(entry.path, f"{entry.status.value}: {entry.problem}")
    lines = "\n".join(f"  {entry.describe}" for entry in listed)
    return ConfigError(f"run '{cfg.run.name}' has checkpoints in {run_dir}, but none can be resumed:\n{lines}\n"
                       f"Resume from another checkpoint with --resume-from, or start this run again from step 0 "
                       f"with {START_OVER} (the old directory is moved aside, nothing is deleted)")


def set_aside(run_dir: Location) -> Location:
    """Move a previous attempt's run directory to `<name>.replaced-<time>` beside it."""
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.move_to(target)
    return target


def has_outputs(run_dir: Location) -> bool:
    """Whether a run directory holds metrics or checkpoints that a fresh start would overwrite."""
    return bool(checkpoint_dirs(run_dir)) or (run_dir / METRICS_FILE).size() > 0


def choose_start(cfg: JobConfig, run_dir: Where, resume_from: Optional[Where], start_over: bool) -> Start:
    """Verify and pick the starting checkpoint once, on the driver; refuse what cannot continue this config."""
    run_dir = locate(run_dir)
    if resume_from is not None:
        chosen = _explicit(resume_from)
        if chosen.path.parent == run_dir:
            keep(chosen.path, "resumed from explicitly (--resume-from)")
    elif start_over:
        chosen = None
    else:
        chosen = newest_whole(run_dir)
        if chosen is None and any(c.status is not Status.PARTIAL or (c.path / KEEP).exists()
                                  for c in survey(run_dir, warn=lambda _: None)):
            raise _none_usable(run_dir, cfg)
    if chosen is None:
        return Start(None, None)
    saved = read_manifest(chosen.path)
    if saved.get("config") is not None and (changes := state_changes(saved["config"], cfg)):
        raise ConfigError(f"{chosen.path} holds a different model ({'; '.join(changes)}); set those keys back "
                          "to resume it, or start another run with run.name=NAME")
    if saved["step"] >= cfg.train.steps:
        raise RunComplete(f"run '{cfg.run.name}' is already complete at step {saved['step']} ({chosen.path}); raise "
                          f"train.steps to continue it (train.steps={2 * saved['step']}), or start another with "
                          f"run.name=NAME")
    return Start(chosen.path, saved)


def start_fresh(cfg: JobConfig, run_dir: Where) -> None:
    """Before step 0: move a previous attempt's outputs aside and rename its MLflow run, so nothing is overwritten."""
    import warnings

    from mor_dist.tracking.experiment import TrackingWarning, tracking_uri  # MLflow only when a run starts over
    from mor_dist.tracking.lineage import retire_runs_named

    run_dir = locate(run_dir)
    if not has_outputs(run_dir):
        return
    moved = set_aside(run_dir)
    print(f"starting run '{cfg.run.name}' again from step 0: its previous outputs are now in {moved}", flush=True)
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg, run_dir)
        try:
            retire_runs_named(uri, cfg.tracking.experiment, cfg.run.name, f"started over; outputs in {moved}")
        except Exception as err:
            warnings.warn(f"MLflow runs named '{cfg.run.name}' at {uri} were not renamed ({type(err).__name__}: "
                          f"{err})", TrackingWarning, stacklevel=2)
