"""Compare tracked runs: `python jobs/compare.py [--experiment E | --run-ids ID ...] [--tracking-uri URI]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mor_dist.tracking.compare import compare, default_tracking_uri  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="mor-dist", help="MLflow experiment name (default: mor-dist)")
    parser.add_argument("--run-ids", nargs="+", default=[], help="compare these runs instead of a whole experiment")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.model_kind = 'mor'\"")
    parser.add_argument("--tracking-uri", default=default_tracking_uri(),
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    parser.add_argument("--plot", type=Path, default=Path("runs/compare_loss.png"),
                        help="where to write the loss-versus-tokens PNG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        table = compare(args.tracking_uri, args.experiment, args.run_ids, args.plot, args.filter)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nloss versus tokens: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
