"""Inference throughput, the paper's protocol: `python jobs/benchmark.py inference [options]`.

A queue of requests with no prompt (generation starts from one BOS token), generation lengths drawn
from a normal distribution around a mean, continuous batching from the queue. MoR (N_r = 2, 3, 4,
expert-choice, causal threshold rule, depth-wise batching) against vanilla of the same depth
(sequence-wise batching, same engine), at a fixed batch of 32 and at "max" batch: 32 scaled by how
many more sequences fit in device memory next to MoR's parameters and KV cache than vanilla's.
Models are fresh; each MoR router's thresholds are calibrated so that the tokens reaching depth r
match the capacity c_r, as a trained router does. Ratios come from one process, one run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from mor_dist.cmdline import command, non_negative_float, non_negative_int, positive_float, positive_int
from mor_dist.bench.report import GPU_MISSING, append_under, block, environment
from mor_dist.config import REPO_ROOT, JobConfig, load_config
from mor_dist.inference.engine import Engine
from mor_dist.inference.generation import build_single
from mor_dist.inference.sampling import Sampler
from mor_dist.inference.scheduler import Request, RunStats, Scheduler
from mor_dist.model.mor import MoRModel

SECTION = "## Inference (`jobs/benchmark.py inference`)"
TINY = ["model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=192", "train.precision=fp32"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="jobs/benchmark.py inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "360m"], default="360m" if gpu else "tiny",
                   help="360m: configs/mor_360m_nr{N}.yaml vs vanilla_360m.yaml; tiny: the same depths at h=64")
    p.add_argument("--requests", type=positive_int, default=1000 if gpu else 256, help="requests in the queue")
    p.add_argument("--mean-len", type=positive_int, default=256 if gpu else 32, help="mean generated tokens per request")
    p.add_argument("--std-frac", type=non_negative_float, default=0.25, help="length standard deviation / mean")
    p.add_argument("--batch", type=positive_int, default=32, help="the fixed batch (concurrent sequences)")
    p.add_argument("--recursions", type=int, choices=[2, 3, 4], nargs="+", default=[2, 3, 4])
    p.add_argument("--no-max-batch", action="store_true", help="skip the max-batch setting")
    p.add_argument("--memory-gib", type=positive_float, default=80.0, help="device memory the max batch is sized for")
    p.add_argument("--kv-sharing", action="store_true", help="MoR with recursive KV sharing")
    p.add_argument("--vocab", type=positive_int, default=None, help="vocabulary (default: 49152 for 360m, 512 for tiny)")
    p.add_argument("--warmup-requests", type=non_negative_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed rounds, models interleaved; medians")
    p.add_argument("--threads", type=positive_int, default=None if gpu else 1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--append", type=Path, default=None, help="append the results under the inference section here")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every model, e.g. train.precision=fp32")
    return p.parse_intermixed_args(argv)


def configs(args: argparse.Namespace, n: int) -> tuple[JobConfig, JobConfig]:
    """MoR-N and vanilla of the same depth (34 layers for MoR-4, as the paper)."""
    extra = (TINY if args.preset == "tiny" else []) + args.overrides
    share = [f"routing.kv_sharing={str(args.kv_sharing).lower()}"]
    mor = load_config(REPO_ROOT / "configs" / f"mor_360m_nr{n}.yaml", extra + share)
    depth = [f"model.num_layers={mor.model.num_layers}"]
    vanilla = load_config(REPO_ROOT / "configs" / "vanilla_360m.yaml", extra + depth)
    return mor, vanilla


def requests(args: argparse.Namespace, bos: int) -> list[Request]:
    """No prompt; lengths ~ N(mean, std_frac * mean), clipped to [1, 2 * mean]."""
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.normal(float(args.mean_len), args.std_frac * args.mean_len, (args.requests,), generator=gen)
    return [Request([bos], int(min(max(1, round(x)), 2 * args.mean_len))) for x in lengths.tolist()]


def sampler() -> Sampler:
    """Sampling, not greedy: a fresh model's greedy stream repeats one token, which no router can split."""
    return Sampler(temperature=1.0, seed=0)


def calibrate(model: MoRModel, reqs: list[Request], max_len: int, batch: int) -> list[float]:
    """Per-recursion thresholds so that a fraction c_r / c_{r-1} of the candidates continue at r."""
    caps = model.cfg.capacities
    thresholds = [model.cfg.routing.threshold] * len(caps)
    for r in range(1, len(caps)):
        if caps[r] >= 1.0:
            continue
        engine = Engine(model, batch, max_len, thresholds=thresholds)
        engine.rule.trace = {}
        Scheduler(engine, sampler()).run(reqs)
        scores = torch.cat(engine.rule.trace[r]).float()
        thresholds[r] = float(torch.quantile(scores, 1.0 - caps[r] / caps[r - 1]))
    return thresholds


@dataclass
class Measured:
    """One model at one batch: median over the repeats."""

    name: str
    batch: int
    tokens_per_s: float
    kv_bytes_per_token: float
    mean_depth: float
    block_fill: float  # mean shared-block batch / batch while requests were waiting


def timed(model: MoRModel, reqs: list[Request], batch: int, max_len: int,
          thresholds: list[float] | None) -> tuple[float, Engine, RunStats]:
    """Tokens/s of one pass over the queue (a fresh engine; allocation is not timed)."""
    fractions = model.cfg.capacities if model.routed else None
    engine = Engine(model, batch, max_len, fractions, thresholds)
    stats = Scheduler(engine, sampler()).run(reqs)
    return stats.generated / stats.seconds, engine, stats


def compare(runs: list[tuple[str, MoRModel, int, list[float] | None]], reqs: list[Request], warm: list[Request],
            max_len: int, repeats: int) -> list[Measured]:
    """Warm every model up, then time them in turn, `repeats` rounds; medians."""
    for _, model, batch, thresholds in runs:
        timed(model, warm, batch, max_len, thresholds)
    speeds: list[list[float]] = [[] for _ in runs]
    last: list = [None] * len(runs)
    for _ in range(repeats):
        for i, (_, model, batch, thresholds) in enumerate(runs):
            tps, engine, stats = timed(model, reqs, batch, max_len, thresholds)
            speeds[i].append(tps)
            last[i] = (engine, stats)
    out = []
    for (name, _, batch, _), tps, (engine, stats) in zip(runs, speeds, last):
        waiting = [b for b, q in zip(stats.block_batches, stats.queued) if q] or [batch]
        out.append(Measured(name, batch, statistics.median(tps), engine.cache.report()["kv_bytes_per_token"],
                            stats.depth_total / stats.generated, sum(waiting) / len(waiting) / batch))
    return out


def memory_per_sequence(model: MoRModel, max_len: int) -> tuple[int, float]:
    """(parameter bytes, KV bytes one sequence allocates) from the model and its cache."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    fractions = model.cfg.capacities if model.routed else None
    return params, Engine(model, 1, max_len, fractions).cache.report()["kv_bytes_per_sequence"]


def max_batch(batch: int, memory: float, mor: tuple[int, float], vanilla: tuple[int, float]) -> int:
    """`batch` scaled by how many more sequences fit next to MoR's parameters and KV than vanilla's."""
    fits = lambda pv: (memory - pv[0]) / pv[1]  # noqa: E731
    return math.floor(batch * fits(mor) / fits(vanilla))


def run(args: argparse.Namespace) -> list[dict]:
    """Every MoR-N against its vanilla; one row per (N, batch setting)."""
    on_cuda = torch.cuda.is_available()
    vocab = args.vocab or (49152 if args.preset == "360m" else 512)
    reqs = requests(args, bos=0)
    warm = reqs[:args.warmup_requests]
    max_len = 1 + max(r.max_new_tokens for r in reqs)
    rows = []
    for n in args.recursions:
        mor_cfg, van_cfg = configs(args, n)
        vanilla = build_single(van_cfg, vocab, on_cuda)
        mor = build_single(mor_cfg, vocab, on_cuda)
        thresholds = calibrate(mor, reqs[:args.batch], max_len, args.batch)
        batches = [("fixed", args.batch)]
        if not args.no_max_batch:
            batches.append(("max", max_batch(args.batch, args.memory_gib * 2**30, memory_per_sequence(mor, max_len),
                                             memory_per_sequence(vanilla, max_len))))
        runs = [(f"vanilla-{van_cfg.model.num_layers}", vanilla, args.batch, None)]
        name = f"MoR-{n}" + (" (KV sharing)" if args.kv_sharing else "")
        runs += [(name, mor, batch, thresholds) for _, batch in batches]
        base, *measured = compare(runs, reqs, warm, max_len, args.repeats)
        for (setting, _), m in zip(batches, measured):
            rows.append({"model": m.name, "vanilla": base.name, "setting": setting, "batch": m.batch,
                         "tokens_per_s": m.tokens_per_s, "vanilla_tokens_per_s": base.tokens_per_s,
                         "ratio": m.tokens_per_s / base.tokens_per_s, "mean_depth": m.mean_depth,
                         "block_fill": m.block_fill, "kv_bytes_per_token": m.kv_bytes_per_token,
                         "vanilla_kv_bytes_per_token": base.kv_bytes_per_token,
                         "kv_ratio": m.kv_bytes_per_token / base.kv_bytes_per_token, "thresholds": thresholds})
        del mor, vanilla
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the results."""
    lines = ["| model | vs | batch | tokens/s | vanilla tokens/s | ratio | mean depth | block fill | "
             "KV bytes/token (MoR / vanilla) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['vanilla']} | {r['setting']} {r['batch']} | {r['tokens_per_s']:.0f} | "
                     f"{r['vanilla_tokens_per_s']:.0f} | **{r['ratio']:.2f}x** | {r['mean_depth']:.2f} | "
                     f"{r['block_fill']:.2f} | {r['kv_bytes_per_token']:.0f} / {r['vanilla_kv_bytes_per_token']:.0f}"
                     f" ({r['kv_ratio']:.2f}) |")
    return "\n".join(lines)


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    on_cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_cuda else "CPU"
    title = (f"Inference, {device}, preset {args.preset}: {args.requests} requests, mean length {args.mean_len}, "
             f"median of {args.repeats}")
    notes = [] if on_cuda else [GPU_MISSING]
    command = "python jobs/benchmark.py inference " + " ".join(shlex.quote(a) for a in argv)
    text = block(title, environment(on_cuda), command, table(rows), notes)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))
    if args.append is not None:
        append_under(args.append, text, SECTION)
        print(f"appended to {args.append}")
    return 0


