"""Ray Train's controller side of a launch: retention after each checkpoint, one line per restart's cause."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.train import UserCallback

from mor_dist.failures import cause, first_causes
from mor_dist.catalog import prune


class Supervisor(UserCallback):
    """Runs in Ray Train's controller (not the driver): retention after each checkpoint, and per restart a line for
    each cause, naming the workers it took (a lost node takes all of its workers at once)."""

    def __init__(self, run_dir: Path, keep_newest: int, protect: list[Path], max_failures: int,
                 start_step: int) -> None:
        self.run_dir = run_dir
        self.keep_newest = keep_newest
        self.protect = protect
        self.max_failures = max_failures
        self.checkpoint_step = start_step
        self.failures = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        self.checkpoint_step = int(metrics[0]["step"])
        prune(self.run_dir, self.keep_newest, self.protect)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        if self.failures > self.max_failures:
            return  # final: the driver prints the summary
        ranks_by_cause: dict[str, list[int]] = {}
        for rank, err in sorted(first_causes(worker_exceptions).items()):
            ranks_by_cause.setdefault(cause(err), []).append(rank)
        for why, ranks in ranks_by_cause.items():
            who = f"worker rank {ranks[0]}" if len(ranks) == 1 else f"worker ranks {', '.join(map(str, ranks))}"
            print(f"{who} lost: {why}; restarting the workers from step {self.checkpoint_step} "
                  f"(restart {self.failures} of run.max_failures={self.max_failures})", flush=True)
