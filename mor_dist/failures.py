"""When training stops for good: what failed, the last good checkpoint, and how to go on (no Ray import)."""

from __future__ import annotations

from typing import Any, Optional

from mor_dist.catalog import Status, survey
from mor_dist.location import Where


class TrainingFailed(Exception):
    """Training stopped for good; `summary` says what happened and how to go on, `details` holds Ray's error."""

    def __init__(self, summary: str, details: str) -> None:
        super().__init__(summary)
        self.summary = summary
        self.details = details


PROCESS_DIED = ("ActorDied", "ActorUnavailable", "NodeDied", "WorkerHealthCheckFailed")
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "remote process exited", "Broken pipe")


def lost_peer(err: BaseException) -> bool:
    """Whether a worker failed only because another one vanished (its collective broke)."""
    return any(text in str(err) for text in PEER_LOST)


def cause(err: BaseException) -> str:
    """One line on why a worker stopped."""
    name = type(err).__name__
    if any(kind in name for kind in PROCESS_DIED):
        return "its process died (killed, out of memory, or its node was lost)"
    if lost_peer(err):
        return "a peer worker vanished in the middle of a collective"
    text = str(err).strip()
    # Ray wraps a worker's exception with its traceback; the last line is the exception itself.
    last = text.splitlines()[-1].strip() if text else ""
    return f"{name}: {last}" if last and not last.startswith(name) else (last or name)


def first_causes(failures: dict[int, BaseException]) -> dict[int, BaseException]:
    """The failures that started it: workers that failed only because a peer vanished are left out."""
    primary = {rank: err for rank, err in failures.items() if not lost_peer(err)}
    return primary or failures


def newest_complete(run_dir: Where, launch: Optional[str] = None) -> Optional[Any]:
    """The newest checkpoint (of one launch, if given) whose every rank finished writing (manifests only; nothing
    re-read)."""
    return next((c for c in survey(run_dir, warn=lambda _: None)
                 if c.status is Status.WHOLE and launch in (None, c.launch)), None)


def failure_summary(err: BaseException, run_dir: Where) -> TrainingFailed:
    """What failed, the last good checkpoint, and how to resume, before Ray's own error text."""
    failures = first_causes(getattr(err, "worker_failures", None) or {})
    lines = ["training failed:"]
    lines += [f"  worker rank {rank}: {cause(exc)}" for rank, exc in sorted(failures.items())[:4]]
    if len(failures) > 4:
        lines.append(f"  ... and {len(failures) - 4} more workers")
    if not failures:
        lines.append(f"  {cause(err)}")
    last = newest_complete(run_dir)
    if last is not None:
        lines.append(f"last checkpoint: {last.path} (step {last.step})")
        lines.append("resume: run the same command again without --resume-from/--start-over; it continues from "
                     "there (run.max_failures=N lets Ray restart lost workers by itself)")
    else:
        lines.append(f"no checkpoint was written in {run_dir}; running the command again starts from step 0")
    return TrainingFailed("\n".join(lines), str(err))
