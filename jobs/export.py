"""Export a training checkpoint to one file: `python jobs/export.py CHECKPOINT_DIR OUT.pt`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mor_dist.config import ConfigError  # noqa: E402





def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (runs/<name>/checkpoint_...)")
    parser.add_argument("out", type=Path, help="the single file to write (.pt)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from mor_dist.train.export import export

    try:
        payload = export(args.checkpoint, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = sum(t.numel() for t in payload["model"].values())
    print(f"wrote {args.out}: step {payload['step']}, {params / 1e6:.2f}M parameters, tp=pp=1")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
