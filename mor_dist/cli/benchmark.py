"""Benchmarks: `mor-benchmark train|inference|anchors|scaling ...` (or `python jobs/benchmark.py`)."""

from __future__ import annotations

import importlib
import sys

from mor_dist.cmdline import command

USAGE = ("usage: python jobs/benchmark.py {train,inference,anchors,scaling} [options]  (--help after the mode for its "
         "options)")


@command
def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "inference", "anchors", "scaling"):
        print(USAGE, file=sys.stderr)
        return 2
    module = importlib.import_module(f"mor_dist.bench.{argv[0]}")
    return module.main(argv[1:])
