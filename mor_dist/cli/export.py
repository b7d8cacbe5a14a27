"""Export a training checkpoint to one file: `mor-export CHECKPOINT_DIR OUT.pt` (or `python jobs/export.py`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mor_dist.cmdline import command


@command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/export.py", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (runs/<name>/checkpoint_...)")
    parser.add_argument("out", type=Path, help="the single file to write (.pt)")
    args = parser.parse_args(argv)
    from mor_dist.train.export import export  # megatron and torch: after the arguments are known to be good

    payload = export(args.checkpoint, args.out)
    params = sum(t.numel() for t in payload["model"].values())
    print(f"wrote {args.out}: step {payload['step']}, {params / 1e6:.2f}M parameters, tp=pp=1")
    return 0
