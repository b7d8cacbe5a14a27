"""Validation-time router views: depth metrics, a depth-distribution plot, a table of example tokens."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from matplotlib.figure import Figure

from mor_dist.data import Tokenizer


def depth_metrics(depths: torch.Tensor, num_recursions: int) -> dict[str, float]:
    """Fraction of tokens reaching each depth, mean depth, and the dead-token ratio of depths [B, s].

    Dead-token ratio: fraction of sequence positions that no sequence of the batch sends through the
    last recursion.
    """
    out = {f"router/val/depth{r}_reached": float((depths >= r).float().mean()) for r in range(1, num_recursions + 1)}
    out["router/val/mean_depth"] = float(depths.float().mean())
    out["router/val/dead_token_ratio"] = 1.0 - float((depths >= num_recursions).any(0).float().mean())
    return out


def depth_plot(depths: torch.Tensor, num_recursions: int, step: int, path: Path) -> None:
    """PNG: share of tokens per depth, and mean depth per sequence position."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    counts = torch.bincount(depths.flatten().long(), minlength=num_recursions + 1)[: num_recursions + 1]
    left.bar(range(num_recursions + 1), (counts.float() / depths.numel()).tolist(), color="tab:blue")
    left.set(xlabel="recursion depth", ylabel="fraction of tokens", xticks=range(num_recursions + 1), ylim=(0, 1))
    right.plot(depths.float().mean(0).tolist(), color="tab:orange", linewidth=1)
    right.set(xlabel="sequence position", ylabel="mean depth", ylim=(0, num_recursions + 0.2))
    fig.suptitle(f"Token depth distribution, validation at step {step}")
    fig.savefig(path, dpi=100)


def _cell(text: str) -> str:
    """A token as a markdown table cell: whitespace and pipes made visible."""
    return "`" + text.replace("\n", "\\n").replace("\t", "\\t").replace("|", "\\|").replace("`", "'") + "`"


def depth_table(tokens: torch.Tensor, depths: torch.Tensor, tokenizer: Tokenizer, step: int, path: Path,
                positions: int = 48, frequent: int = 20) -> None:
    """Markdown: the first sequence's tokens with their depths, and the mean depth of frequent tokens."""
    lines = [f"# Token depths, validation at step {step}", "", "## First validation sequence", "",
             "| position | token | depth |", "|---:|---|---:|"]
    for pos, (tok, depth) in enumerate(zip(tokens[0, :positions].tolist(), depths[0, :positions].tolist())):
        lines.append(f"| {pos} | {_cell(tokenizer.decode([tok]))} | {depth} |")
    counts = Counter(tokens.flatten().tolist())
    flat_tokens, flat_depths = tokens.flatten(), depths.flatten().float()
    lines += ["", f"## The {frequent} most frequent tokens", "", "| token | count | mean depth |", "|---|---:|---:|"]
    for tok, count in counts.most_common(frequent):
        mean = float(flat_depths[flat_tokens == tok].mean())
        lines.append(f"| {_cell(tokenizer.decode([tok]))} | {count} | {mean:.2f} |")
    path.write_text("\n".join(lines) + "\n")
