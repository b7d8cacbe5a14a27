"""Training throughput: `python jobs/benchmark.py train [--config C ...] [--baseline] [overrides]`.

For each config, warm-up plus timed optimizer steps on the device at hand, in one process (no Ray,
no MLflow), through the real build_model, megatron DDP, optimizer and train_step on synthetic
token batches. Reports tokens/s, model TFLOP/s from executed FLOPs (model/flops.py, 3x forward),
MFU against this device's measured dense matmul peak (bf16 on GPUs, fp32 on CPUs) and peak
memory. `--baseline` also trains megatron-core's own GPTModel (TE spec on GPUs) at the vanilla
shape of the same effective depth, width, heads, FFN, sequence and batch, in the same process,
and prints each model's tokens/s and memory ratios to it.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from mor_dist.cmdline import command, non_negative_int, positive_int
from mor_dist.bench.baseline import build_baseline, vanilla_twin
from mor_dist.bench.harness import init_world, reset_memory, synthetic_batches, timed_steps
from mor_dist.bench.report import GPU_MISSING, Row, append_under, block, environment, table
from mor_dist.config import DEFAULT_CONFIG, JobConfig, load_config, validate
from mor_dist.errors import ConfigError
from mor_dist.model.flops import forward_flops_per_token
from mor_dist.model.mor import build_model
from mor_dist.tracking.perf import device_peak
from mor_dist.train.trainable import Trainable


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="jobs/benchmark.py train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, action="append", default=None,
                   help=f"run config, repeatable (default {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})")
    p.add_argument("--steps", type=positive_int, default=10 if gpu else 3, help="timed optimizer steps")
    p.add_argument("--warmup", type=non_negative_int, default=3 if gpu else 1, help="untimed steps first")
    p.add_argument("--micro-batches", type=positive_int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--vocab", type=positive_int, default=None,
                   help="vocabulary (default: model.vocab_size, else 49152 (SmolLM) on GPU, 512 on CPU)")
    p.add_argument("--baseline", action="store_true", help="also megatron-core's GPTModel at each shape, with ratios")
    p.add_argument("--append", type=Path, default=None, help="append the results under the training section here")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every config, e.g. train.precision=fp8")
    return p.parse_args(argv)


def bench_config(path: Path, args: argparse.Namespace) -> JobConfig:
    """The config with the benchmark's step count and one micro-batch group per step, in one process."""
    cfg = load_config(path, args.overrides)
    p = cfg.parallel
    if (p.tp, p.pp, p.dp) != (1, 1, 1):
        raise ConfigError("the train benchmark runs one process: set parallel.tp=1 parallel.pp=1 parallel.dp=1")
    cfg.train = replace(cfg.train, steps=args.warmup + args.steps, warmup_steps=0,
                        global_batch_size=cfg.train.micro_batch_size * args.micro_batches)
    cfg.tracking.enabled = False
    validate(cfg)
    return cfg


def precision_label(cfg: JobConfig) -> str:
    t = cfg.train
    return f"fp8-{t.fp8_recipe}" if t.precision == "fp8" else t.precision


def measure(name: str, implementation: str, cfg: JobConfig, build: Callable[[], torch.nn.Module], vocab: int,
            args: argparse.Namespace, on_cuda: bool) -> Row:
    """Build, train warm-up + timed steps, free; `cfg` is the config whose executed FLOPs the model runs."""
    start = reset_memory(on_cuda)
    run = Trainable.around(cfg, build(), on_cuda)
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    timing = timed_steps(run, synthetic_batches(cfg, vocab, device), args.warmup, args.steps, on_cuda, start)
    del run
    reset_memory(on_cuda)
    tflops = forward_flops_per_token(cfg, vocab).training * timing.tokens_per_s / 1e12
    return Row(name, implementation, precision_label(cfg), cfg.train.micro_batch_size, cfg.model.seq_length,
               timing.tokens_per_s, tflops, device_peak(on_cuda, cfg.train.precision).mfu(tflops, 1),
               timing.peak_mem_gib)


def vocab_size(cfg: JobConfig, args: argparse.Namespace, on_cuda: bool) -> int:
    return cfg.model.vocab_size or args.vocab or (49152 if on_cuda else 512)


def shape(cfg: JobConfig) -> tuple:
    """What the GPTModel baseline depends on: shape, batch and precision settings."""
    m, t = cfg.model, cfg.train
    return (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size, m.seq_length,
            m.rotary_base, m.norm_epsilon, m.tie_embeddings, t.micro_batch_size, t.global_batch_size, t.precision,
            t.fp8_recipe, t.recompute, t.fused_kernels)


def run(cfgs: list[tuple[str, JobConfig]], args: argparse.Namespace, on_cuda: bool) -> list[Row]:
    """Every config, each preceded by its GPTModel baseline (once per shape) when asked."""
    rows: list[Row] = []
    baselines: dict[tuple, Row] = {}
    for name, cfg in cfgs:
        vocab = vocab_size(cfg, args, on_cuda)
        base = None
        if args.baseline:
            key = shape(cfg) + (vocab,)
            if key not in baselines:
                twin = vanilla_twin(cfg)
                baselines[key] = measure(f"vanilla {twin.model.num_layers} layers", "megatron-core GPTModel", twin,
                                         lambda: build_baseline(cfg, vocab, on_cuda), vocab, args, on_cuda)
                rows.append(baselines[key])
            base = baselines[key]
        row = measure(f"{name} ({cfg.layout.plan.describe()})", "mor-dist MoRModel", cfg,
                      lambda: build_model(cfg, vocab, on_cuda), vocab, args, on_cuda)
        if base is not None:
            memory = row.peak_mem_gib / base.peak_mem_gib if on_cuda else None  # CPU: one process-wide high-water mark
            row = replace(row, vs_tokens=row.tokens_per_s / base.tokens_per_s, vs_memory=memory)
        rows.append(row)
    return rows


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = [(path.stem, bench_config(path, args)) for path in args.config or [DEFAULT_CONFIG]]
    init_world(on_cuda)
    rows = run(cfgs, args, on_cuda)
    command = "python jobs/benchmark.py train " + " ".join(shlex.quote(a) for a in argv)
    precision = cfgs[0][1].train.precision
    peak = device_peak(on_cuda, precision)
    env = environment(on_cuda, peak)
    vocabs = sorted({vocab_size(cfg, args, on_cuda) for _, cfg in cfgs})
    notes = [f"{args.warmup} warm-up + {args.steps} timed steps of {args.micro_batches} micro-batch(es) of synthetic "
             f"tokens (vocabulary {', '.join(map(str, vocabs))}); MFU counts executed FLOPs (3x forward) against "
             "the peak above."]
    if not on_cuda:
        notes.append(GPU_MISSING + " CPU peak memory is the process's resident high-water mark, so memory "
                     "ratios are n/a.")
    text = block("Training throughput", env, command, table(rows), notes)
    print(text)
    if args.append:
        append_under(args.append, text)
        print(f"appended to {args.append}")
    return 0
