"""Benchmarks: `python jobs/benchmark.py train ...` and `python jobs/benchmark.py inference ...`."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

USAGE = "usage: python jobs/benchmark.py {train,inference} [options]  (--help after the mode for its options)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "inference"):
        print(USAGE, file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron's notes on absent TE/Apex at import
    if argv[0] == "train":
        from mor_dist.bench.train import main as run
    else:
        from mor_dist.inference.bench import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
