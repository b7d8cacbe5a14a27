"""Training throughput: `python jobs/benchmark.py train [--config C ...] [--baseline] [overrides]`.

Every model is built and warmed up first, then timed in interleaved rounds (`--rounds` of `--steps`
optimizer steps each, models in turn), on the device at hand, in one process (no Ray, no MLflow),
through the real build_model, megatron DDP, optimizer and train_step on synthetic token batches.
Reports median tokens/s with its range, model TFLOP/s from executed FLOPs (model/flops.py, 3x
forward), MFU against the device's peak (tracking/perf.py: the vendor's dense peak on known GPUs,
else a matmul timed once per process) and peak memory. `--baseline` also trains megatron-core's own
GPTModel (TE spec on GPUs) at the vanilla shape of the same effective depth, width, heads, FFN,
sequence and batch, in the same rounds, and prints the median of the per-round tokens/s ratios with
their range, in the table and as one summary line per comparison.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from mor_dist.cmdline import command, non_negative_int, positive_int
from mor_dist.bench.baseline import build_baseline, vanilla_twin
from mor_dist.bench.harness import init_world, reset_memory, synthetic_batches, timed_steps
from mor_dist.bench.report import GPU_MISSING, Row, append_under, block, environment, ratio_summary, table
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
    p.add_argument("--steps", type=positive_int, default=10 if gpu else 3, help="timed optimizer steps per round")
    p.add_argument("--rounds", type=positive_int, default=5, help="timed rounds, models interleaved; medians")
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


@dataclass
class Contender:
    """One model in the benchmark: built, warmed up, its peak memory alone, its tokens/s of each round."""

    name: str
    implementation: str
    cfg: JobConfig  # the config whose executed FLOPs the model runs
    run: Trainable
    batches: Iterator
    vocab: int
    peak_mem_gib: float
    speeds: list[float] = field(default_factory=list)

    def row(self, on_cuda: bool) -> Row:
        """Median tokens/s over the rounds (min and max beside it), with its FLOP rate and MFU."""
        tokens_per_s = statistics.median(self.speeds)
        tflops = forward_flops_per_token(self.cfg, self.vocab).training * tokens_per_s / 1e12
        return Row(self.name, self.implementation, precision_label(self.cfg), self.cfg.train.micro_batch_size,
                   self.cfg.model.seq_length, tokens_per_s, tflops,
                   device_peak(on_cuda, self.cfg.train.precision).mfu(tflops, 1), self.peak_mem_gib,
                   spread=(min(self.speeds), max(self.speeds)))


def prepare(name: str, implementation: str, cfg: JobConfig, build: Callable[[], torch.nn.Module], vocab: int,
            warmup: int, on_cuda: bool) -> Contender:
    """Build and warm up one model; its memory is measured now, above what the models before it hold."""
    start = reset_memory(on_cuda)
    run = Trainable.around(cfg, build(), on_cuda)
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    batches = synthetic_batches(cfg, vocab, device)
    timing = timed_steps(run, batches, warmup, 1, on_cuda, start)
    return Contender(name, implementation, cfg, run, batches, vocab, timing.peak_mem_gib)


def interleave(contenders: list[Contender], rounds: int, steps: int, on_cuda: bool) -> None:
    """`rounds` rounds of `steps` timed steps per model, models in turn (reversed every other round), so that a
    slower or busier stretch of the machine touches every model alike."""
    for index in range(rounds):
        for contender in contenders if index % 2 == 0 else contenders[::-1]:
            contender.speeds.append(timed_steps(contender.run, contender.batches, 0, steps, on_cuda).tokens_per_s)


def vocab_size(cfg: JobConfig, args: argparse.Namespace, on_cuda: bool) -> int:
    return cfg.model.vocab_size or args.vocab or (49152 if on_cuda else 512)


def shape(cfg: JobConfig) -> tuple:
    """What the GPTModel baseline depends on: shape, batch and precision settings."""
    m, t = cfg.model, cfg.train
    return (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size, m.seq_length,
            m.rotary_base, m.norm_epsilon, m.tie_embeddings, t.micro_batch_size, t.global_batch_size, t.precision,
            t.fp8_recipe, t.recompute, t.fused_kernels)


def run(cfgs: list[tuple[str, JobConfig]], args: argparse.Namespace,
        on_cuda: bool) -> tuple[list[Row], list[str]]:
    """Every config, after its GPTModel baseline (once per shape) when asked, timed in interleaved rounds; the
    table rows and one summary line per comparison."""
    contenders: list[Contender] = []
    pairs: list[tuple[Contender, Contender]] = []  # (model, its baseline)
    baselines: dict[tuple, Contender] = {}
    for name, cfg in cfgs:
        vocab = vocab_size(cfg, args, on_cuda)
        if args.baseline and (key := shape(cfg) + (vocab,)) not in baselines:
            twin = vanilla_twin(cfg)
            baselines[key] = prepare(f"vanilla {twin.model.num_layers} layers", "megatron-core GPTModel", twin,
                                     lambda: build_baseline(cfg, vocab, on_cuda), vocab, args.warmup, on_cuda)
            contenders.append(baselines[key])
        model = prepare(f"{name} ({cfg.layout.plan.describe()})", "mor-dist MoRModel", cfg,
                        lambda: build_model(cfg, vocab, on_cuda), vocab, args.warmup, on_cuda)
        contenders.append(model)
        if args.baseline:
            pairs.append((model, baselines[shape(cfg) + (vocab,)]))
    interleave(contenders, args.rounds, args.steps, on_cuda)
    rows = {id(c): c.row(on_cuda) for c in contenders}
    summary = []
    for model, base in pairs:
        ratios = [m / b for m, b in zip(model.speeds, base.speeds)]  # within a round: the same machine state
        memory = model.peak_mem_gib / base.peak_mem_gib if on_cuda else None  # CPU: one process-wide high-water mark
        rows[id(model)] = replace(rows[id(model)], vs_tokens=statistics.median(ratios), vs_memory=memory,
                                  vs_tokens_range=(min(ratios), max(ratios)))
        summary.append(f"{model.name} vs {base.name} ({base.implementation}), tokens/s: "
                       f"{ratio_summary(ratios)}")
    return [rows[id(c)] for c in contenders], summary


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = [(path.stem, bench_config(path, args)) for path in args.config or [DEFAULT_CONFIG]]
    init_world(on_cuda)
    rows, summary = run(cfgs, args, on_cuda)
    command = "python jobs/benchmark.py train " + " ".join(shlex.quote(a) for a in argv)
    precision = cfgs[0][1].train.precision
    peak = device_peak(on_cuda, precision)
    env = environment(on_cuda, peak)
    vocabs = sorted({vocab_size(cfg, args, on_cuda) for _, cfg in cfgs})
    notes = [f"{args.warmup} warm-up steps, then {args.rounds} rounds of {args.steps} timed steps per model, models "
             f"in turn; {args.micro_batches} micro-batch(es) of synthetic tokens per step (vocabulary "
             f"{', '.join(map(str, vocabs))}). tokens/s is the median over the rounds (min-max in brackets), ratios "
             "the median of the per-round ratios; MFU counts executed FLOPs (3x forward) against the peak above."]
    if not on_cuda:
        notes.append(GPU_MISSING + " CPU peak memory is the process's resident high-water mark, so memory "
                     "ratios are n/a.")
    if summary:
        notes.append("Summary:\n\n```\n" + "\n".join(summary) + "\n```")
    text = block("Training throughput", env, command, table(rows), notes)
    print(text)
    if args.append:
        append_under(args.append, text)
        print(f"appended to {args.append}")
    return 0
