"""Pre-train a MoR (or vanilla / recursive) model: `mor-pretrain [--config C] [key.sub=value ...]`
(from a checkout: `python jobs/pretrain.py ...`). Options and dotted overrides may come in any order."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mor_dist.cmdline import command
from mor_dist.config import load_config
from mor_dist.errors import ConfigError
from mor_dist.launch import RunComplete, TrainingFailed, dry_run, launch


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/pretrain.py", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="YAML run config (default: configs/tiny_mor.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="build the model, print its shape and FLOPs, exit")
    parser.add_argument("--resume-from", default=None,
                        help="a checkpoint directory or its URI to start from (default: the run's newest whole checkpoint)")
    parser.add_argument("--start-over", action="store_true",
                        help="start the run again from step 0 although it has checkpoints (its old directory is moved "
                             "aside and its MLflow run renamed; nothing is deleted)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 routing.kind=token_choice")
    return parser.parse_intermixed_args(argv)


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    if args.start_over and args.resume_from is not None:
        raise ConfigError("--start-over starts from step 0 and --resume-from from a checkpoint; give one of them")
    try:
        result = launch(cfg, args.resume_from, args.start_over)  # a path (made absolute) or a URI
    except RunComplete as done:
        print(done)
        return 0
    except TrainingFailed as failed:
        print(f"\n{failed.summary}\n\ndetails:\n{failed.details}", file=sys.stderr)
        return 1
    from mor_dist.tracking.tracker import where_to_look  # imports megatron: only once a run has finished

    print("\nDone. Outputs:")
    print(f"  run directory   {result.run_dir}")
    print(f"  checkpoint      {result.checkpoint}")
    print(f"  metrics (file)  {result.run_dir / 'metrics.jsonl'}")
    if result.tracking_uri:
        print(f"  MLflow          {result.tracking_uri}   ({where_to_look(result.tracking_uri, result.run_id)})")
    else:
        print("  MLflow          off (tracking.enabled=false)")
    final = {k: round(v, 4) for k, v in result.metrics.items() if k in ("loss", "val_loss", "val_ppl")}
    print(f"  final metrics   {final}")
    return 0
