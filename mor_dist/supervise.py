"""Ray Train's controller side of a launch: retention after each checkpoint, one line per restart's cause."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from mor_dist.failures import cause, first_causes, newest_complete
from mor_dist.catalog import prune
from mor_dist.location import Location


class Supervisor(UserCallback):
    """Runs in Ray Train's controller (not the driver): retention after each checkpoint, and per restart a line for
    each cause, naming the workers it took (a lost node takes all of its workers at once)."""

    def __init__(self, run_dir: Location, keep_newest: int, protect: list[Location], max_failures: int,
                 start_step: int, launch: str) -> None:
        self.run_dir = run_dir
        self.keep_newest = keep_newest
        self.protect = protect
        self.max_failures = max_failures
        self.start_step = start_step
        self.launch = launch
        self.failures = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is not None:
            prune(self.run_dir, self.keep_newest, self.protect)

    def restart_step(self) -> int:
        """Where the restarted workers start, as they choose it: the newest checkpoint this launch finished writing
        (from the manifests; the workers verify it), else the launch's start. Not the last report this callback saw:
        a worker group can write and upload a checkpoint and fail before its report reaches the controller."""
        mine = newest_complete(self.run_dir, self.launch)
        return mine.step if mine is not None else self.start_step

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        if self.failures > self.max_failures:
            return  # final: the driver prints the summary
        ranks_by_cause: dict[str, list[int]] = {}
        for rank, err in sorted(first_causes(worker_exceptions).items()):
            ranks_by_cause.setdefault(cause(err), []).append(rank)
        step = self.restart_step()
        for why, ranks in ranks_by_cause.items():
            who = f"worker rank {ranks[0]}" if len(ranks) == 1 else f"worker ranks {', '.join(map(str, ranks))}"
            print(f"{who} lost: {why}; restarting the workers from step {step} "
                  f"(restart {self.failures} of run.max_failures={self.max_failures})", flush=True)
