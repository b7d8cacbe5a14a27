"""Benchmarks: `mor-benchmark train|inference|inference-curves|anchors|scaling ...` (or `python jobs/benchmark.py`)."""

from __future__ import annotations

import importlib
import sys

from mor_dist.cmdline import command

MODES = ("train", "inference", "inference-curves", "anchors", "scaling")
USAGE = (f"usage: python jobs/benchmark.py {{{','.join(MODES)}}} [options]  (--help after the mode for its options)")


@command
def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MODES:
        print(USAGE, file=sys.stderr)
        return 2
    module = importlib.import_module(f"mor_dist.bench.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])
