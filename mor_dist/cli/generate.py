"""Generate text: `mor-generate "PROMPT" [--checkpoint RUN_OR_FILE | --config C key=value ...]` (or
`python jobs/generate.py`).

MoR models route with the causal rule (expert-choice: threshold, hierarchical) and decode with the
recursion-wise KV cache (or recursive KV sharing, as the model was trained).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mor_dist.cmdline import non_negative_float, non_negative_int, positive_int
from mor_dist.cmdline import checkpoint_path, command
from mor_dist.config import load_config
from mor_dist.errors import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/generate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="text to continue ('' starts from the end-of-text token)")
    parser.add_argument("--checkpoint", type=checkpoint_path, default=None,
                        help="a run directory (its newest whole checkpoint) or a checkpoint_* directory (a path or a "
                             "URI), or a file jobs/export.py wrote; its config is used")
    parser.add_argument("--config", type=Path, default=None, help="YAML config of a fresh model (default: tiny)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k likeliest (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-text token")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the fresh model's config")
    return parser.parse_intermixed_args(argv)


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from mor_dist.inference.generation import generate_text
    from mor_dist.inference.sampling import Sampler

    if args.checkpoint is not None and (args.config is not None or args.overrides):
        raise ConfigError("--checkpoint carries its own config; drop --config and overrides")
    cfg = None if args.checkpoint is not None else load_config(args.config, args.overrides)
    text = generate_text(args.prompt, cfg, args.checkpoint, args.max_new_tokens,
                         Sampler(args.temperature, args.top_k, seed=args.seed), args.stop_at_eos, args.cuda)
    print(args.prompt + text)
    return 0
