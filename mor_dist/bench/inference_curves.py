"""Inference curves: `python jobs/benchmark.py inference-curves [options]`.

Decoding tokens/s and KV bytes per sequence of MoR-N (and its vanilla of the same depth) against the batch
(concurrent sequences, at `--mean-len`) and against the mean generated length (at `--at-batch`), with the
inference benchmark's protocol (`jobs/benchmark.py inference`: prompt-free requests, normal lengths,
continuous batching, calibrated thresholds). Each point is a queue of `--waves` x batch requests; at each
point every model is warmed up and timed in interleaved rounds (medians). Beside each measured KV ratio to
vanilla stands the paper's accounting (Tab 2): the shared block holds (N_r+1)/2N_r of its layers' KV
(1/N_r with KV sharing), the other layers as much as vanilla's.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import torch

from mor_dist.bench.inference import calibrate, compare, configs, paper_block_ratio, requests
from mor_dist.bench.report import GPU_MISSING, block, environment, save_curves
from mor_dist.cmdline import command, non_negative_float, positive_int
from mor_dist.inference.generation import build_single
from mor_dist.inference.scheduler import Request


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="jobs/benchmark.py inference-curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "360m"], default="360m" if gpu else "tiny",
                   help="360m: configs/mor_360m_nr{N}.yaml vs vanilla_360m.yaml; tiny: the same depths at h=64")
    p.add_argument("--recursions", type=int, choices=[2, 3, 4], nargs="+", default=[2, 3, 4])
    p.add_argument("--batches", type=positive_int, nargs="+", default=[4, 8, 16, 32, 64],
                   help="the batch curve's points (at --mean-len)")
    p.add_argument("--mean-lens", type=positive_int, nargs="+", default=[16, 32, 64, 128],
                   help="the length curve's points (at --at-batch)")
    p.add_argument("--mean-len", type=positive_int, default=256 if gpu else 32, help="mean length of the batch curve")
    p.add_argument("--at-batch", type=positive_int, default=32 if gpu else 16, help="batch of the length curve")
    p.add_argument("--waves", type=positive_int, default=4, help="requests per point = waves x batch")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed rounds per point, models interleaved")
    p.add_argument("--std-frac", type=non_negative_float, default=0.25, help="length standard deviation / mean")
    p.add_argument("--kv-sharing", action="store_true", help="MoR with recursive KV sharing")
    p.add_argument("--vocab", type=positive_int, default=None, help="vocabulary (default: 49152 for 360m, 512 for tiny)")
    p.add_argument("--threads", type=positive_int, default=None if gpu else 1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    p.add_argument("--plot", type=Path, default=None, help="write the curves here (PNG)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every model, e.g. train.precision=fp32")
    return p.parse_intermixed_args(argv)


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(curve, batch, mean length) of every point: the batch curve, then the length curve."""
    return ([("batch", b, args.mean_len) for b in args.batches] +
            [("length", args.at_batch, m) for m in args.mean_lens])


def queue(args: argparse.Namespace, batch: int, mean_len: int) -> list[Request]:
    """waves x batch prompt-free requests of this mean length (the inference benchmark's distribution)."""
    return requests(args.waves * batch, mean_len, args.std_frac, args.seed, bos=0)


def measure(args: argparse.Namespace) -> list[dict]:
    """One record per (N, curve point, model): median tokens/s, peak KV bytes per sequence in flight."""
    on_cuda = torch.cuda.is_available()
    vocab = args.vocab or (49152 if args.preset == "360m" else 512)
    records = []
    for n in args.recursions:
        mor_cfg, van_cfg = configs(args, n)
        vanilla, mor = build_single(van_cfg, vocab, on_cuda), build_single(mor_cfg, vocab, on_cuda)
        middle = queue(args, args.at_batch, args.mean_len)
        thresholds = calibrate(mor, middle, 1 + max(r.max_new_tokens for r in middle), args.at_batch)
        block_layers, layers = len(mor.plan.block), van_cfg.model.num_layers
        whole_model_paper = (layers - block_layers * n + block_layers * n * paper_block_ratio(n, args.kv_sharing)) \
            / layers
        for curve, batch, mean_len in points(args):
            reqs = queue(args, batch, mean_len)
            max_len = 1 + max(r.max_new_tokens for r in reqs)
            base, routed = compare([(f"vanilla-{layers}", vanilla, batch, None, None),
                                    (f"MoR-{n}", mor, batch, thresholds, None)], reqs, reqs[:batch], max_len,
                                   args.repeats)
            for m in (base, routed):
                records.append({"n_r": n, "curve": curve, "batch": batch, "mean_len": mean_len, "model": m.name,
                                "tokens_per_s": m.tokens_per_s, "tokens_per_s_range": [min(m.speeds), max(m.speeds)],
                                "kv_bytes_per_sequence": m.kv_peak_bytes / batch, "mean_depth": m.mean_depth,
                                "speed_vs_vanilla": m.tokens_per_s / base.tokens_per_s,
                                "kv_vs_vanilla": m.kv_peak_bytes / base.kv_peak_bytes,
                                "paper_kv_vs_vanilla": whole_model_paper if m is routed else 1.0})
        del vanilla, mor
    return records


def plot(records: list[dict], path: Path) -> None:
    """Four panels: tokens/s and KV bytes per sequence against the batch, then against the mean length (each MoR-N
    solid, its vanilla dotted); the KV panels' dashed lines are the paper's accounting applied to vanilla's KV."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    for col, (curve, x_key, x_label) in enumerate((("batch", "batch", "batch (concurrent sequences)"),
                                                   ("length", "mean_len", "mean generated tokens"))):
        speed, kv = axes[0][col], axes[1][col]
        for i, n in enumerate(sorted({r["n_r"] for r in records})):
            rows = [r for r in records if r["n_r"] == n and r["curve"] == curve]
            for routed in (True, False):
                line = sorted((r for r in rows if r["model"].startswith("MoR") == routed), key=lambda r: r[x_key])
                x = [r[x_key] for r in line]
                style = {"color": f"C{i}", "marker": "o" if routed else ".", "linestyle": "-" if routed else ":",
                         "label": line[0]["model"] + ("" if routed else f" (for MoR-{n})")}
                speed.plot(x, [r["tokens_per_s"] for r in line], **style)
                kv.plot(x, [r["kv_bytes_per_sequence"] for r in line], **style)
                if routed:
                    vanilla_kv = sorted((r for r in rows if not r["model"].startswith("MoR")), key=lambda r: r[x_key])
                    kv.plot(x, [v["kv_bytes_per_sequence"] * r["paper_kv_vs_vanilla"] for v, r in zip(vanilla_kv, line)],
                            "--", color=f"C{i}")
        for ax, label in ((speed, "decode tokens/s"), (kv, "peak KV bytes per sequence (dashed: paper)")):
            ax.set(xscale="log", xlabel=x_label, ylabel=label)
            ticks = sorted({r[x_key] for r in records if r["curve"] == curve})
            ax.minorticks_off()
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def table(records: list[dict]) -> str:
    lines = ["| curve | batch | mean length | model | tokens/s (median, range) | vs vanilla | mean depth "
             "| KV bytes/seq | KV vs vanilla (paper) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if not r["model"].startswith("MoR"):
            continue
        low, high = r["tokens_per_s_range"]
        lines.append(f"| {r['curve']} | {r['batch']} | {r['mean_len']} | {r['model']} | {r['tokens_per_s']:,.0f} "
                     f"({low:,.0f}-{high:,.0f}) | {r['speed_vs_vanilla']:.2f}x | {r['mean_depth']:.2f} "
                     f"| {r['kv_bytes_per_sequence']:,.0f} | {r['kv_vs_vanilla']:.2f} ({r['paper_kv_vs_vanilla']:.2f}) |")
    return "\n".join(lines)


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = measure(args)
    save_curves(records, argv, args.json, args.plot, plot)
    on_cuda = torch.cuda.is_available()
    print(block("Inference curves", environment(on_cuda), "python jobs/benchmark.py inference-curves " +
                " ".join(shlex.quote(a) for a in argv), table(records), [] if on_cuda else [GPU_MISSING]))
    return 0
