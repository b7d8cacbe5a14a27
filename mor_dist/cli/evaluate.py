"""Few-shot evaluation with lm-evaluation-harness: `mor-evaluate SOURCE --tasks T1,T2 [...]` (or
`python jobs/evaluate.py`).

SOURCE is a run directory (its newest whole checkpoint), a checkpoint_* directory, a file
jobs/export.py wrote, or a Hugging Face folder (lm-eval's own hf model; MoR folders through
mor_dist.hf). `--tasks paper` runs the paper's set (lambada_openai, hellaswag, piqa, winogrande,
arc_easy, arc_challenge, mmlu); `--include-path DIR` adds local YAML tasks (offline). Results land in
the training run's MLflow run when SOURCE belongs to one, else in a new run of experiment mor-dist-eval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mor_dist.cmdline import checkpoint_path, command, non_negative_int, positive_int


@command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=checkpoint_path,
                        help="run directory or checkpoint directory (a path or a URI), exported file or HF folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, or 'paper'")
    parser.add_argument("--num-fewshot", type=non_negative_int, default=None, help="default: each task's own")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most this many documents per task")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--routing", choices=("causal", "topk", "both"), default="causal",
                        help="MoR's rule: causal (what generation does), topk (the paper's training rule) or both")
    parser.add_argument("--include-path", type=Path, default=None, help="a folder of local lm-eval YAML tasks")
    args = parser.parse_args(argv)
    if not args.source.exists():
        from mor_dist.errors import ConfigError

        raise ConfigError(f"{args.source} does not exist; give a run directory, a checkpoint directory, an exported "
                          "file or a Hugging Face folder")
    from lm_eval.utils import make_table

    from mor_dist.evaluation.run import evaluate, record, task_names

    tasks = task_names(args.tasks)
    for routing in ("causal", "topk") if args.routing == "both" else (args.routing,):
        done = evaluate(args.source, tasks, args.num_fewshot, args.limit, args.batch_size, routing,
                        args.include_path)
        print(f"\n{routing} routing\n" + make_table({
            "results": done.results, "configs": {}, "versions": {t: c["version"] for t, c in done.configs.items()},
            "n-shot": {t: c["num_fewshot"] for t, c in done.configs.items()}}))
        for task, depth in done.mean_depth.items():
            print(f"{task}: mean recursion depth {depth:.3f} ({routing} routing)")
        print(f"recorded in MLflow: {record(done, args.source, tasks)}")
    return 0
