"""Benchmarks: `mor-benchmark train ...` and `mor-benchmark inference ...` (or `python jobs/benchmark.py`)."""

from __future__ import annotations

import sys

from mor_dist.cmdline import command

USAGE = "usage: python jobs/benchmark.py {train,inference} [options]  (--help after the mode for its options)"


@command
def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "inference"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "train":
        from mor_dist.bench.train import main as run
    else:
        from mor_dist.bench.inference import main as run
    return run(argv[1:])
