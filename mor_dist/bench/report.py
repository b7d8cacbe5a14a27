"""Benchmark rows as markdown, the environment they were measured in, and appending under a docs section."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mor_dist.tracking.perf import Peak

SECTION = "## Training throughput (`jobs/benchmark.py train`)"
GPU_MISSING = "No GPU here: CPU figures only; the GPU (H100) figures are missing."


@dataclass(frozen=True)
class Row:
    """One model measured: throughput, executed-FLOPs rate, MFU, peak memory, ratios to the GPTModel baseline."""

    model: str
    implementation: str
    precision: str
    micro_batch: int
    seq_length: int
    tokens_per_s: float
    tflops: float
    mfu: float
    peak_mem_gib: float
    vs_tokens: Optional[float] = None
    vs_memory: Optional[float] = None
    spread: Optional[tuple[float, float]] = None  # min and max tokens/s over the rounds
    vs_tokens_range: Optional[tuple[float, float]] = None  # min and max of the per-round ratios

    def markdown(self) -> str:
        ratio = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
        speed = f"{self.tokens_per_s:,.0f}" + (f" ({self.spread[0]:,.0f}-{self.spread[1]:,.0f})" if self.spread else "")
        vs = ratio(self.vs_tokens) + (f" ({self.vs_tokens_range[0]:.2f}-{self.vs_tokens_range[1]:.2f})"
                                      if self.vs_tokens_range else "")
        return (f"| {self.model} | {self.implementation} | {self.precision} | {self.micro_batch} x {self.seq_length} "
                f"| {speed} | {self.tflops:.3g} | {100 * self.mfu:.3g}% | {self.peak_mem_gib:.2f} "
                f"| {vs} | {ratio(self.vs_memory)} |")


def ratio_summary(ratios: list[float]) -> str:
    """`1.31x (median, 1.25-1.36 over 5 rounds)`: one comparison at a glance, for a reader or a script."""
    return (f"{statistics.median(ratios):.2f}x (median, {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} "
            f"rounds)")


HEADER = ("| model | implementation | precision | micro-batch x seq | tokens/s | model TFLOP/s | MFU "
          "| peak memory GiB | tokens/s vs GPTModel | memory vs GPTModel |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(on_cuda: bool, peak: Optional[Peak] = None) -> str:
    """Device, the MFU denominator (when given) and library versions, on one line."""
    if on_cuda:
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    parts = [device]
    if peak is not None:
        parts.append(f"MFU peak {peak.flops / 1e12:.4g} TFLOP/s ({peak.source})")
    import megatron.core

    parts.append(f"Python {platform.python_version()}, torch {torch.__version__}, megatron-core "
                 f"{megatron.core.__version__}, transformer-engine {_version('transformer_engine')}")
    return "; ".join(parts)


def block(title: str, env: str, command: str, table: str, notes: list[str]) -> str:
    """A dated markdown block: title, environment, the exact command, the table, notes."""
    today = datetime.date.today().isoformat()
    lines = [f"### {title} ({today})", "", env + ".", "", "```", command, "```", "", table, ""]
    lines += [note + "\n" for note in notes]
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER] + [row.markdown() for row in rows])


def save_curves(records: list[dict], argv: list[str], json_path: Optional[Path], plot_path: Optional[Path],
                plot: Callable[[list[dict], Path], None]) -> None:
    """A curve benchmark's measurements as JSON (with the command's arguments) and its plot, where asked for."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"command": argv, "records": records}, indent=1))
    if plot_path:
        plot(records, plot_path)


def append_under(path: Path, text: str, section: str = SECTION) -> None:
    """Insert `text` at the end of `section` (before the next `## ` heading), creating the section if absent."""
    content = path.read_text() if path.exists() else ""
    start = content.find(section)
    if start < 0:
        path.write_text(content.rstrip("\n") + f"\n\n{section}\n\n{text.rstrip()}\n")
        return
    after = content.find("\n## ", start + len(section))
    end = len(content) if after < 0 else after + 1
    head, tail = content[:end].rstrip("\n"), content[end:]
    path.write_text(f"{head}\n\n{text.rstrip()}\n" + (f"\n{tail}" if tail else ""))


def main(argv: Optional[list[str]] = None) -> int:
    """Append a block of plain text (e.g. pytest's summary) with this host's environment under the section."""
    p = argparse.ArgumentParser(prog="python -m mor_dist.bench.report", description=main.__doc__)
    p.add_argument("doc", type=Path)
    p.add_argument("title")
    p.add_argument("command")
    p.add_argument("body", type=Path, help="file whose text goes into the block")
    args = p.parse_args(argv)
    body = "```\n" + args.body.read_text().strip() + "\n```"
    append_under(args.doc, block(args.title, environment(torch.cuda.is_available()), args.command, body, []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
