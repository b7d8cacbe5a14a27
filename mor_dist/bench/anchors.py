"""What a user would run instead: `python jobs/benchmark.py anchors [options]`.

Our vanilla model's decoding (the project's engine: KV cache, continuous batching) against Hugging Face
`transformers` `generate` on the same weights (the `--format hf` export mapping), at the same shape,
batch and number of new tokens: every sequence starts from one BOS token and generates exactly
`--new-tokens` greedily. transformers runs with its static cache and with its default dynamic cache.
Models are timed in interleaved rounds; ratios are medians of per-round ratios (ours / theirs).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mor_dist.bench.inference import TINY
from mor_dist.bench.report import GPU_MISSING, append_under, block, environment, ratio_summary
from mor_dist.cmdline import command, positive_int
from mor_dist.config import REPO_ROOT, JobConfig, load_config
from mor_dist.inference.engine import Engine
from mor_dist.inference.generation import build_single
from mor_dist.inference.sampling import Sampler
from mor_dist.inference.scheduler import Request, Scheduler
from mor_dist.model.mor import MoRModel

SECTION = "## Anchors (`jobs/benchmark.py anchors`)"
BOS = 0
HF_CACHES = ("static", "dynamic")


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="jobs/benchmark.py anchors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "360m"], default="360m" if gpu else "tiny",
                   help="configs/vanilla_360m.yaml, or its depth at hidden 64 (tiny)")
    p.add_argument("--batch", type=positive_int, default=32 if gpu else 8, help="sequences decoded together")
    p.add_argument("--new-tokens", type=positive_int, default=256 if gpu else 64, help="tokens each sequence generates")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds, implementations interleaved")
    p.add_argument("--vocab", type=positive_int, default=None, help="vocabulary (default: 49152 for 360m, 512 for tiny)")
    p.add_argument("--threads", type=positive_int, default=None if gpu else 1, help="torch CPU threads")
    p.add_argument("--append", type=Path, default=None, help="append the results under the anchors section here")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the model, e.g. model.num_layers=16")
    return p.parse_intermixed_args(argv)


def vanilla_config(args: argparse.Namespace) -> JobConfig:
    return load_config(REPO_ROOT / "configs" / "vanilla_360m.yaml", (TINY if args.preset == "tiny" else []) +
                       args.overrides)


def hf_twin(model: MoRModel, cfg: JobConfig, vocab: int) -> torch.nn.Module:
    """transformers' LlamaForCausalLM holding our vanilla model's weights (the `--format hf` export mapping)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mor_dist.model.from_pretrained import heads_of
    from mor_dist.pretrained.hf_folder import hf_weights, llama_config_values
    from mor_dist.train.export import global_tensors

    config = LlamaConfig(num_hidden_layers=cfg.model.num_layers, **llama_config_values(cfg.to_dict()["model"], vocab))
    weights = hf_weights(global_tensors(model), list(cfg.layout.plan.unrolled), heads_of(cfg), cfg.model.tie_embeddings)
    twin = LlamaForCausalLM(config).to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    missing, unexpected = twin.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weights do not map onto transformers' Llama: missing {missing}, unexpected {unexpected}")
    if cfg.model.tie_embeddings:
        twin.tie_weights()
    return twin.eval()


def ours(model: MoRModel, batch: int, new_tokens: int) -> Callable[[], list[list[int]]]:
    """Greedy decoding of `batch` sequences of `new_tokens` tokens with the project's engine."""
    def generate() -> list[list[int]]:
        engine = Engine(model, batch, 1 + new_tokens)
        stats = Scheduler(engine, Sampler(temperature=0.0)).run([Request([BOS], new_tokens)] * batch)
        return stats.outputs
    return generate


def theirs(twin: torch.nn.Module, batch: int, new_tokens: int, cache: str) -> Callable[[], list[list[int]]]:
    """The same with transformers' generate and one of its caches."""
    device = next(twin.parameters()).device
    prompt = torch.full((batch, 1), BOS, dtype=torch.long, device=device)
    extra = {"cache_implementation": "static"} if cache == "static" else {}

    def generate() -> list[list[int]]:
        with torch.inference_mode():
            out = twin.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=BOS, eos_token_id=None,
                                **extra)
        return out[:, 1:].tolist()
    return generate


@dataclass
class Contender:
    name: str
    generate: Callable[[], list[list[int]]]
    speeds: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


def interleave(contenders: list[Contender], rounds: int, tokens: int, on_cuda: bool) -> None:
    """One untimed pass each, then `rounds` timed rounds, in turn (reversed every other round)."""
    for contender in contenders:
        contender.outputs = contender.generate()
    for index in range(rounds):
        for contender in contenders if index % 2 == 0 else contenders[::-1]:
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            contender.generate()
            if on_cuda:
                torch.cuda.synchronize()
            contender.speeds.append(tokens / (time.perf_counter() - start))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated positions where two greedy decodings chose the same token."""
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def run(args: argparse.Namespace) -> tuple[list[Contender], JobConfig]:
    on_cuda = torch.cuda.is_available()
    cfg = vanilla_config(args)
    vocab = args.vocab or (49152 if args.preset == "360m" else 512)
    torch.manual_seed(0)
    model = build_single(cfg, vocab, on_cuda)
    twin = hf_twin(model, cfg, vocab)
    contenders = [Contender("mor-dist engine", ours(model, args.batch, args.new_tokens))]
    contenders += [Contender(f"transformers generate ({cache} cache)", theirs(twin, args.batch, args.new_tokens, cache))
                   for cache in HF_CACHES]
    interleave(contenders, args.rounds, args.batch * args.new_tokens, on_cuda)
    return contenders, cfg


def report(contenders: list[Contender], cfg: JobConfig, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The markdown table and one summary line per anchor."""
    ours_ = contenders[0]
    lines = ["| implementation | layers x hidden | batch x new tokens | tokens/s (median, range) | ours vs this "
             "| same greedy tokens |", "|---|---|---|---|---|---|"]
    summary = []
    for c in contenders:
        ratios = [a / b for a, b in zip(ours_.speeds, c.speeds)]
        lines.append(f"| {c.name} | {cfg.model.num_layers} x {cfg.model.hidden_size} | {args.batch} x "
                     f"{args.new_tokens} | {statistics.median(c.speeds):,.0f} ({min(c.speeds):,.0f}-"
                     f"{max(c.speeds):,.0f}) | {statistics.median(ratios):.2f}x | "
                     f"{100 * agreement(ours_.outputs, c.outputs):.1f}% |")
        if c is not ours_:
            summary.append(f"{ours_.name} vs {c.name}, tokens/s: {ratio_summary(ratios)}")
    return "\n".join(lines), summary


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contenders, cfg = run(args)
    on_cuda = torch.cuda.is_available()
    table, summary = report(contenders, cfg, args)
    notes = ([] if on_cuda else [GPU_MISSING]) + [
        f"Greedy decoding from one BOS token, exactly {args.new_tokens} new tokens per sequence, the same weights "
        f"in both; {args.rounds} timed rounds after one untimed pass each.",
        "Summary:\n\n```\n" + "\n".join(summary) + "\n```"]
    command_line = "python jobs/benchmark.py anchors " + " ".join(shlex.quote(a) for a in argv)
    text = block("Anchors: decoding against transformers", environment(on_cuda), command_line, table, notes)
    print(text)
    if args.append is not None:
        append_under(args.append, text, SECTION)
        print(f"appended to {args.append}")
    return 0
