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
from mor_dist.bench.report import GPU_MISSING, append_under, block, environment, ratio_summary
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


def requests(count: int, mean_len: int, std_frac: float, seed: int, bos: int) -> list[Request]:
    """No prompt; lengths ~ N(mean, std_frac * mean), clipped to [1, 2 * mean]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.normal(float(mean_len), std_frac * mean_len, (count,), generator=gen)
    return [Request([bos], int(min(max(1, round(x)), 2 * mean_len))) for x in lengths.tolist()]


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
    """One model at one batch: median tokens/s over the repeats; KV use and depth of the last repeat."""

    name: str
    batch: int
    tokens_per_s: float
    kv_peak_bytes: int  # the most K/V bytes its sequences held at once
    block_peak_bytes: int  # of which the shared block's paged pool (MoR)
    mean_depth: float
    block_fill: float  # mean shared-block batch / batch while requests were waiting
    preemptions: int
    peak_blocks: int  # blocks of the paged pool in use at the peak (MoR)
    speeds: list[float]  # tokens/s of each round


def timed(model: MoRModel, reqs: list[Request], batch: int, max_len: int, thresholds: list[float] | None,
          block_budget: int | None = None) -> tuple[float, Engine, RunStats]:
    """Tokens/s of one pass over the queue (a fresh engine; allocation is not timed)."""
    engine = Engine(model, batch, max_len, thresholds, block_budget)
    stats = Scheduler(engine, sampler()).run(reqs)
    return stats.generated / stats.seconds, engine, stats


def compare(runs: list[tuple[str, MoRModel, int, list[float] | None, int | None]], reqs: list[Request],
            warm: list[Request], max_len: int, repeats: int) -> list[Measured]:
    """Warm every model up, then time them in turn, `repeats` rounds; medians."""
    for _, model, batch, thresholds, budget in runs:
        timed(model, warm, batch, max_len, thresholds, budget)
    speeds: list[list[float]] = [[] for _ in runs]
    last: list = [None] * len(runs)
    for _ in range(repeats):
        for i, (_, model, batch, thresholds, budget) in enumerate(runs):
            tps, engine, stats = timed(model, reqs, batch, max_len, thresholds, budget)
            speeds[i].append(tps)
            last[i] = (engine, stats)
    out = []
    for (name, _, batch, _, _), tps, (engine, stats) in zip(runs, speeds, last):
        waiting = [b for b, q in zip(stats.block_batches, stats.queued) if q] or [batch]
        pool = engine.cache.pools.get("block")
        out.append(Measured(name, batch, statistics.median(tps), engine.cache.peak_used_bytes,
                            pool.peak_used_bytes if pool is not None else 0, stats.depth_total / stats.generated,
                            sum(waiting) / len(waiting) / batch, stats.preemptions,
                            pool.peak_blocks if pool is not None else 0, tps))
    return out


def parameter_bytes(model: MoRModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def max_batch(batch: int, memory: float, mor: tuple[int, float], vanilla: tuple[int, float]) -> int:
    """`batch` scaled by how many more sequences fit next to MoR's parameters and KV than vanilla's
    ((parameter bytes, KV bytes per sequence) each)."""
    fits = lambda pv: (memory - pv[0]) / pv[1]  # noqa: E731
    return math.floor(batch * fits(mor) / fits(vanilla))


def paper_block_ratio(n: int, kv_sharing: bool) -> float:
    """The paper's KV memory of the recursion blocks against vanilla's (Tab 2): (N_r+1)/2N_r, or 1/N_r shared."""
    return 1.0 / n if kv_sharing else (n + 1) / (2 * n)


def row(m: Measured, base: Measured, setting: str, n: int, block_layers: int, vanilla_layers: int,
        target_depth: float, kv_sharing: bool, thresholds: list[float]) -> dict:
    """One table row: throughput against vanilla, measured KV use against vanilla's and the paper's."""
    per_layer = base.kv_peak_bytes / base.batch / vanilla_layers  # vanilla's K/V per sequence and layer
    return {"model": m.name, "vanilla": base.name, "setting": setting, "batch": m.batch,
            "tokens_per_s": m.tokens_per_s, "vanilla_tokens_per_s": base.tokens_per_s,
            "ratio": m.tokens_per_s / base.tokens_per_s, "mean_depth": m.mean_depth, "target_depth": target_depth,
            "block_fill": m.block_fill, "preemptions": m.preemptions,
            "kv_bytes_per_sequence": m.kv_peak_bytes / m.batch, "vanilla_kv_bytes_per_sequence": base.kv_peak_bytes / base.batch,
            "kv_ratio": (m.kv_peak_bytes / m.batch) / (base.kv_peak_bytes / base.batch),
            "block_ratio": m.block_peak_bytes / m.batch / (per_layer * block_layers * n),
            "paper_block_ratio": paper_block_ratio(n, kv_sharing), "thresholds": thresholds,
            "round_ratios": [a / b for a, b in zip(m.speeds, base.speeds)] if setting == "fixed" else None}


def run(args: argparse.Namespace) -> list[dict]:
    """Every MoR-N against its vanilla; one row per (N, batch setting)."""
    on_cuda = torch.cuda.is_available()
    vocab = args.vocab or (49152 if args.preset == "360m" else 512)
    reqs = requests(args.requests, args.mean_len, args.std_frac, args.seed, bos=0)
    warm = reqs[:args.warmup_requests]
    max_len = 1 + max(r.max_new_tokens for r in reqs)
    rows = []
    for n in args.recursions:
        mor_cfg, van_cfg = configs(args, n)
        vanilla = build_single(van_cfg, vocab, on_cuda)
        mor = build_single(mor_cfg, vocab, on_cuda)
        thresholds = calibrate(mor, reqs[:args.batch], max_len, args.batch)
        name = f"MoR-{n}" + (" (KV sharing)" if args.kv_sharing else "")
        shape = (n, len(mor.plan.block), van_cfg.model.num_layers, sum(mor_cfg.capacities), args.kv_sharing)
        base, fixed = compare([(f"vanilla-{van_cfg.model.num_layers}", vanilla, args.batch, None, None),
                               (name, mor, args.batch, thresholds, None)], reqs, warm, max_len, args.repeats)
        rows.append(row(fixed, base, "fixed", *shape, thresholds))
        if not args.no_max_batch:  # sized from the KV the fixed batch actually used, per sequence
            bigger = max_batch(args.batch, args.memory_gib * 2**30,
                               (parameter_bytes(mor), fixed.kv_peak_bytes / fixed.batch),
                               (parameter_bytes(vanilla), base.kv_peak_bytes / base.batch))
            budget = math.ceil(fixed.peak_blocks / fixed.batch * bigger * 1.05)  # 5% over the measured use
            (most,) = compare([(name, mor, bigger, thresholds, budget)], reqs, warm, max_len, args.repeats)
            rows.append(row(most, base, "max", *shape, thresholds))
        del mor, vanilla
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the results."""
    lines = ["| model | vs | batch | tokens/s | vanilla tokens/s | ratio | mean depth (target) | block fill | "
             "KV bytes/seq, peak used (MoR / vanilla) | shared block KV vs vanilla (paper) | preempted |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['vanilla']} | {r['setting']} {r['batch']} | {r['tokens_per_s']:.0f} | "
                     f"{r['vanilla_tokens_per_s']:.0f} | **{r['ratio']:.2f}x** | {r['mean_depth']:.2f} "
                     f"({r['target_depth']:.2f}) | {r['block_fill']:.2f} | {r['kv_bytes_per_sequence']:.0f} / "
                     f"{r['vanilla_kv_bytes_per_sequence']:.0f} ({r['kv_ratio']:.2f}) | {r['block_ratio']:.2f} "
                     f"({r['paper_block_ratio']:.2f}) | {r['preemptions']} |")
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
    summary = [f"{r['model']} vs {r['vanilla']} at batch {r['batch']}, tokens/s: {ratio_summary(r['round_ratios'])}"
               for r in rows if r["round_ratios"]]  # the fixed batch: both models timed in the same rounds
    notes.append("Summary:\n\n```\n" + "\n".join(summary) + "\n```")
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


