"""Side-by-side comparison of tracked runs: a summary table (with mean depth and lm-eval results) and loss
against tokens and against training compute (the paper compares at equal FLOPs)."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure

from mor_dist.errors import ConfigError
from mor_dist.tracking.lineage import REPLACED
from mor_dist.tracking.metadata import TRAIN_LOSS, VAL_LOSS
from mor_dist.tracking.perf import MFU_MEASURED, MFU_VENDOR

# Runs tracked before the losses moved under loss/ (their stores still hold them).
EARLIER_NAMES = {TRAIN_LOSS: "train/loss", VAL_LOSS: "val/loss"}

DEFAULT_URI = "sqlite:///runs/mlflow.db"  # training's default store with run.storage_path=runs


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the store that training writes to by default."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@dataclass(frozen=True)
class RunSummary:
    """One row of the comparison table."""

    name: str
    run_id: str
    model: str
    params: Optional[int]
    final_val_loss: Optional[float]
    best_val_loss: Optional[float]
    tokens_per_s: Optional[float]
    mfu: Optional[float]
    mfu_measured: bool  # against a timed matmul (CPUs), not a vendor peak
    peak_mem_gib: Optional[float]
    mean_depth: Optional[float]  # at the last validation (top-k routing)
    evals: dict[str, float]  # jobs/evaluate.py results, `<task>/<metric>`: latest value


def find_runs(client: Any, experiment: Optional[str], run_ids: list[str], filter_string: str = "") -> list[Any]:
    """The given runs, else every run of the experiment (oldest first) that no later run replaced, optionally
    filtered."""
    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"no experiment named {experiment!r} in {client.tracking_uri}")
    runs = client.search_runs([found.experiment_id], filter_string, order_by=["attributes.start_time ASC"])
    return [run for run in runs if REPLACED not in run.data.tags]


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, by step (under its earlier name for older runs)."""
    found = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    if not found and key in EARLIER_NAMES:
        return history(client, run_id, EARLIER_NAMES[key])
    return found


def model_label(tags: dict[str, str]) -> str:
    """e.g. `mor expert_choice N_r=3`, `recursive N_r=2`, `vanilla`."""
    kind = tags.get("model_kind", "?")
    if kind == "vanilla":
        return kind
    routing = f" {tags['routing']}" if kind == "mor" and "routing" in tags else ""
    return f"{kind}{routing} N_r={tags.get('num_recursions', '?')}"


def summarize_run(client: Any, run: Any) -> RunSummary:
    """Table row: final/best validation loss, median tokens/s and MFU, maximum peak memory."""
    run_id = run.info.run_id
    val = [v for _, v in history(client, run_id, VAL_LOSS)]
    speed = [v for _, v in history(client, run_id, "perf/tokens_per_s")]
    mfu = [v for _, v in history(client, run_id, MFU_VENDOR)]
    measured = not mfu
    mfu = mfu or [v for _, v in history(client, run_id, MFU_MEASURED)]
    memory = [v for _, v in history(client, run_id, "perf/peak_mem_gib")]
    depth = [v for _, v in history(client, run_id, "router/val/mean_depth")]
    params = run.data.params.get("derived.num_parameters")
    return RunSummary(
        name=run.info.run_name or run_id[:8],
        run_id=run_id,
        model=model_label(run.data.tags),
        params=int(params) if params is not None else None,
        final_val_loss=val[-1] if val else None,
        best_val_loss=min(val) if val else None,
        tokens_per_s=statistics.median(speed) if speed else None,
        mfu=statistics.median(mfu) if mfu else None,
        mfu_measured=measured and bool(mfu),
        peak_mem_gib=max(memory) if memory else None,
        mean_depth=depth[-1] if depth else None,
        evals={key.removeprefix("eval/"): value for key, value in run.data.metrics.items() if key.startswith("eval/")},
    )


def _fmt(value: Optional[float], spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else format(value * scale, spec) + suffix


def format_table(rows: list[RunSummary]) -> str:
    """Aligned plain-text table, one run per line."""
    evals = sorted({key for r in rows for key in r.evals})
    header = ["run", "run id", "model", "params", "final val loss", "best val loss", "mean depth", "tokens/s", "MFU",
              "peak mem GiB", *evals]
    body = [[r.name, r.run_id[:8], r.model, _fmt(r.params, ".2f", 1e-6, "M"), _fmt(r.final_val_loss, ".4f"),
             _fmt(r.best_val_loss, ".4f"), _fmt(r.mean_depth, ".2f"), _fmt(r.tokens_per_s, ",.0f"),
             _fmt(r.mfu, ".1f", 100, "%*" if r.mfu_measured else "%"), _fmt(r.peak_mem_gib, ".2f"), *(_fmt(r.evals.get(k), ".4g") for k in evals)]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.mfu_measured for r in rows):
        lines.append("* MFU against a timed matmul on the device (no vendor peak: CPUs, GPUs not in the table)")
    return "\n".join(lines)


def training_flops_per_token(run: Any) -> Optional[float]:
    """3x the forward FLOPs per token in the paper's App. D accounting (docs/flops.md), else the executed count."""
    params = run.data.params
    value = params.get("derived.budget_flops_per_token") or params.get("derived.flops_per_token")
    return 3.0 * float(value) if value is not None else None


def plot_loss(client: Any, runs: list[Any], path: Path) -> None:
    """PNG: training loss (lines) and validation loss (markers) against tokens seen and against training FLOPs,
    one colour per run."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_tokens, by_flops = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        run_id, color = run.info.run_id, f"C{i % 10}"
        tokens = dict(history(client, run_id, "train/tokens"))
        label = f"{run.info.run_name or run_id[:8]} ({model_label(run.data.tags)})"
        train = [(tokens[s], v) for s, v in history(client, run_id, TRAIN_LOSS) if s in tokens]
        val = [(tokens[s], v) for s, v in history(client, run_id, VAL_LOSS) if s in tokens]
        flops = training_flops_per_token(run)
        for ax, scale in ((by_tokens, 1.0), (by_flops, flops)):
            if scale is None:
                continue
            if train:
                ax.plot([t * scale for t, _ in train], [v for _, v in train], color=color, label=label)
            if val:
                ax.plot([t * scale for t, _ in val], [v for _, v in val], "o", color=color,
                        label=f"{label} val" if train else label)
    by_tokens.set(xlabel="tokens", ylabel="loss", title="Loss versus tokens")
    by_flops.set(xlabel="training FLOPs (3x forward, paper's App. D accounting)", ylabel="loss",
                 title="Loss versus compute")
    for ax in (by_tokens, by_flops):
        ax.grid(alpha=0.3)
    by_tokens.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def compare(tracking_uri: str, experiment: Optional[str], run_ids: list[str], plot_path: Path,
            filter_string: str = "") -> str:
    """The comparison table of the selected runs; writes the loss plot to `plot_path`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"no MLflow store at {tracking_uri} (train first, or pass --tracking-uri)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        runs = find_runs(client, experiment, run_ids, filter_string)
    except MlflowException as err:
        raise ConfigError(err.message) from err
    if not runs:
        raise ConfigError(f"no runs found in experiment {experiment!r} at {tracking_uri}")
    plot_loss(client, runs, plot_path)
    return format_table([summarize_run(client, run) for run in runs])
