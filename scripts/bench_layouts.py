"""Tokens/s of each (tp, pp, dp) layout through the real Ray Train path: `python scripts/bench_layouts.py [overrides]`."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mor_dist.config import load_config  # noqa: E402
from mor_dist.launch import connect_ray, launch  # noqa: E402

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]


def main(overrides: list[str]) -> None:
    storage = Path(tempfile.mkdtemp(prefix="mor-bench-"))
    connect_ray({"CPU": max(tp * pp * dp for tp, pp, dp in LAYOUTS)})  # one local cluster with room for every layout
    rows = []
    for tp, pp, dp in LAYOUTS:
        cfg = load_config(None, ["train.steps=30", "train.log_interval=10", "train.eval_interval=-1",
                                 "train.checkpoint_interval=-1", "train.micro_batch_size=4",
                                 "train.global_batch_size=8", "tracking.enabled=false", "parallel.oversubscribe=true",
                                 f"run.storage_path={storage}", f"run.name=tp{tp}pp{pp}dp{dp}",
                                 f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", *overrides])
        result = launch(cfg)
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = [r["perf/tokens_per_s"] for r in records[1:]]  # skip the first (warm-up) window
        rows.append((tp, pp, dp, sum(steady) / len(steady), records[-1]["loss/train_lm"]))
    base = rows[0][3]
    print("| tp | pp | dp | workers | tokens/s | vs (1,1,1) | loss at step 30 |")
    print("|---|---|---|---|---|---|---|")
    for tp, pp, dp, tps, loss in rows:
        print(f"| {tp} | {pp} | {dp} | {tp * pp * dp} | {tps:,.0f} | {tps / base:.2f}x | {loss:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
