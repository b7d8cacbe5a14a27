"""Training scaling curves: `python jobs/benchmark.py scaling [options]`.

Tokens/s and peak memory of vanilla, recursive (N_r) and MoR (N_r) models against the sequence length, at the
360M presets' depths and a width that fits the device (`--width`), with the same tokens per step at every
length. Tokens/s: every model of one length built, warmed up and timed in interleaved rounds in this process
(medians). Memory: each model alone in a child process (CPU: the highest resident memory, sampled, above the
process's before the build; GPU: peak allocated memory). Next to each measured MoR/vanilla ratio stands the one the executed
FLOPs predict (model/flops.py), so the plot shows whether the speed follows the paper's accounting.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import torch

from mor_dist.bench.harness import init_world, reset_memory
from mor_dist.bench.report import GPU_MISSING, block, environment, save_curves
from mor_dist.bench.train import Contender, interleave, prepare
from mor_dist.cmdline import command, positive_int
from mor_dist.config import REPO_ROOT, JobConfig, load_config
from mor_dist.model.flops import forward_flops_per_token
from mor_dist.model.mor import build_model

PRESETS = {"vanilla": "vanilla_360m.yaml", "recursive": "recursive_360m_nr{n}.yaml", "mor": "mor_360m_nr{n}.yaml"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/benchmark.py scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=positive_int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--recursions", type=int, choices=[2, 3, 4], nargs="+", default=[2, 3, 4])
    p.add_argument("--width", type=positive_int, default=64, help="hidden size (heads of 16 dims, FFN 3x)")
    p.add_argument("--tokens-per-step", type=positive_int, default=4096, help="micro-batch = this / length")
    p.add_argument("--steps", type=positive_int, default=1, help="timed steps per round")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--vocab", type=positive_int, default=512)
    p.add_argument("--no-memory", action="store_true", help="skip the child processes that measure memory")
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    p.add_argument("--plot", type=Path, default=None, help="write the curves here (PNG)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)  # one memory probe
    return p.parse_args(argv)


def config(args: argparse.Namespace, model: str, length: int) -> JobConfig:
    """`model` is vanilla, recursive-N or mor-N; the preset at --width, this length, one micro-batch per step."""
    kind, _, n = model.partition("-")
    heads = max(1, args.width // 16)
    micro = max(1, args.tokens_per_step // length)
    cfg = load_config(REPO_ROOT / "configs" / PRESETS[kind].format(n=n), [
        f"model.hidden_size={args.width}", f"model.num_attention_heads={heads}", f"model.num_query_groups={heads}",
        f"model.ffn_hidden_size={3 * args.width}", f"model.seq_length={length}", "train.precision=fp32",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}", "train.warmup_steps=0",
        "train.steps=100", "tracking.enabled=false"])
    return cfg


def models(args: argparse.Namespace) -> list[str]:
    return ["vanilla", *(f"{kind}-{n}" for kind in ("recursive", "mor") for n in args.recursions)]


def child_peak(args: argparse.Namespace, model: str, length: int) -> float:
    """This process builds one model and trains two steps; the memory that took, in GiB: peak allocated CUDA memory,
    or on CPU the highest resident memory sampled every millisecond above the resident memory before the build
    (the process's own high-water mark is set by imports, not by a small model)."""
    on_cuda = torch.cuda.is_available()
    init_world(on_cuda)
    cfg = config(args, model, length)
    if on_cuda:
        return prepare(model, "", cfg, lambda: build_model(cfg, args.vocab, on_cuda), args.vocab, 1, on_cuda).peak_mem_gib
    process, highest, done = psutil.Process(), [0], threading.Event()
    before = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            highest[0] = max(highest[0], process.memory_info().rss)
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    prepare(model, "", cfg, lambda: build_model(cfg, args.vocab, on_cuda), args.vocab, 1, on_cuda)
    done.set()
    sampler.join()
    return (highest[0] - before) / 2**30


def peak_memory(args: argparse.Namespace, argv: list[str], model: str, length: int) -> float:
    """Peak memory of one model trained alone, in a child process (GiB)."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "benchmark.py"), "scaling", *argv, "--child",
                           model, str(length)], capture_output=True, text=True, check=True, timeout=900)
    return float(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """One record per (model, length): median tokens/s, peak memory, and the FLOP-predicted speed ratio."""
    on_cuda = torch.cuda.is_available()
    init_world(on_cuda)
    probe = not args.no_memory
    records = []
    for length in args.sequences:
        cfgs = {name: config(args, name, length) for name in models(args)}
        contenders: list[Contender] = [
            prepare(name, "", cfg, (lambda c=cfg: build_model(c, args.vocab, on_cuda)), args.vocab, 1, on_cuda)
            for name, cfg in cfgs.items()]
        interleave(contenders, args.rounds, args.steps, on_cuda)
        vanilla_flops = forward_flops_per_token(cfgs["vanilla"], args.vocab).total
        for contender in contenders:
            row = contender.row(on_cuda)
            flops = forward_flops_per_token(contender.cfg, args.vocab).total
            records.append({"model": contender.name, "seq_length": length, "micro_batch": row.micro_batch,
                            "tokens_per_s": row.tokens_per_s, "tokens_per_s_range": list(row.spread),
                            "predicted_speed_vs_vanilla": vanilla_flops / flops,
                            "peak_mem_gib": peak_memory(args, argv, contender.name, length) if probe else None})
        vanilla = next(r["tokens_per_s"] for r in records if r["model"] == "vanilla" and r["seq_length"] == length)
        for record in records:
            if record["seq_length"] == length:
                record["speed_vs_vanilla"] = record["tokens_per_s"] / vanilla
        del contenders
        reset_memory(on_cuda)
    return records


def plot(records: list[dict], path: Path) -> None:
    """Three panels against sequence length: tokens/s, speed against vanilla (measured, and FLOP-predicted
    dashed), peak memory."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    speed, ratio, memory = fig.subplots(1, 3)
    names = list(dict.fromkeys(r["model"] for r in records))
    for i, name in enumerate(names):
        rows = sorted((r for r in records if r["model"] == name), key=lambda r: r["seq_length"])
        x = [r["seq_length"] for r in rows]
        style = {"color": f"C{i}", "marker": "o", "label": name}
        speed.plot(x, [r["tokens_per_s"] for r in rows], **style)
        ratio.plot(x, [r["speed_vs_vanilla"] for r in rows], **style)
        ratio.plot(x, [r["predicted_speed_vs_vanilla"] for r in rows], "--", color=f"C{i}")
        if rows[0]["peak_mem_gib"] is not None:
            memory.plot(x, [r["peak_mem_gib"] for r in rows], **style)
    for ax, label in ((speed, "training tokens/s"), (ratio, "tokens/s vs vanilla (dashed: FLOP-predicted)"),
                      (memory, "peak memory GiB")):
        ax.set(xscale="log", xlabel="sequence length", ylabel=label)
        ax.minorticks_off()
        ax.set_xticks(sorted({r["seq_length"] for r in records}), [str(s) for s in sorted({r["seq_length"]
                                                                                          for r in records})])
        ax.grid(alpha=0.3)
    speed.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def table(records: list[dict]) -> str:
    lines = ["| model | seq | micro-batch | tokens/s (median, range) | vs vanilla | FLOP-predicted | peak memory GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        low, high = r["tokens_per_s_range"]
        lines.append(f"| {r['model']} | {r['seq_length']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} "
                     f"({low:,.0f}-{high:,.0f}) | {r['speed_vs_vanilla']:.2f}x | {r['predicted_speed_vs_vanilla']:.2f}x "
                     f"| {'n/a' if r['peak_mem_gib'] is None else format(r['peak_mem_gib'], '.3f')} |")
    return "\n".join(lines)


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        print(child_peak(args, args.child[0], int(args.child[1])))
        return 0
    records = measure(args, argv)
    save_curves(records, argv, args.json, args.plot, plot)
    on_cuda = torch.cuda.is_available()
    notes = [] if on_cuda else [GPU_MISSING + " CPU memory: in a child process per model, the highest resident "
                                "memory (sampled every millisecond) while it was built and trained, above what the "
                                "process held before."]
    text = block("Training scaling", environment(on_cuda), "python jobs/benchmark.py scaling " +
                 " ".join(shlex.quote(a) for a in argv), table(records), notes)
    print(text)
    return 0
