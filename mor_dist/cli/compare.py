"""Compare tracked runs: `mor-compare [--experiment E | --run-ids ID ...] [--tracking-uri URI]` (or
`python jobs/compare.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mor_dist.cmdline import command
from mor_dist.tracking.compare import compare, default_tracking_uri


@command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/compare.py", description=__doc__)
    parser.add_argument("--experiment", default="mor-dist", help="MLflow experiment name (default: mor-dist)")
    parser.add_argument("--run-ids", nargs="+", default=[], help="compare these runs instead of a whole experiment")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.model_kind = 'mor'\"")
    parser.add_argument("--tracking-uri", default=default_tracking_uri(),
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    parser.add_argument("--plot", type=Path, default=Path("runs/compare_loss.png"),
                        help="where to write the PNG: loss versus tokens and versus training FLOPs")
    args = parser.parse_args(argv)
    print(compare(args.tracking_uri, args.experiment, args.run_ids, args.plot, args.filter))
    print(f"\nloss versus tokens and versus training FLOPs: {args.plot}")
    return 0
