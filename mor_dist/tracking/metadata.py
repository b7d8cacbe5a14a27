"""What identifies a run in MLflow: parameters, tags, metric names, host count."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import torch.distributed as dist

from mor_dist.config import REPO_ROOT, JobConfig, flatten
from mor_dist.model.flops import budget_flops_per_token, forward_flops_per_token, layer_matmul_params

PARAM_VALUE_LIMIT = 500


# The loss curves share one section, which the MLflow UI lists first (sections sort by name), so training and
# validation loss sit side by side and can be drawn in one chart.
TRAIN_LOSS, VAL_LOSS = "loss/train", "loss/val"
LOSS_NAMES = {"loss": TRAIN_LOSS, "lm_loss": "loss/train_lm", "val_loss": VAL_LOSS, "val_causal_loss": "loss/val_causal"}
GIT_COMMIT_ENV = "MOR_DIST_GIT_COMMIT"  # set where the checkout has no .git (the image records it at build time)


def metric_name(key: str) -> str:
    """`/`-grouped MLflow name: losses under `loss/`, `val_ppl` -> `val/ppl`, `lr` -> `train/lr`; grouped names
    unchanged."""
    if "/" in key:
        return key
    if key in LOSS_NAMES:
        return LOSS_NAMES[key]
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    return f"train/{key}"


def parameter_count(cfg: JobConfig, vocab_size: int) -> int:
    """Unique trainable parameters at full size: layers (with their two norms), embeddings, routers."""
    m, layout = cfg.model, cfg.layout
    plan = layout.plan
    layers = plan.num_unique * (layer_matmul_params(cfg) + 2 * m.hidden_size)
    embeddings = vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    routers = 0
    if layout.routed:
        routers = m.num_recursions * m.hidden_size
        if cfg.routing.kind == "expert_choice" and cfg.routing.aux_router:
            routers *= 2
    return layers + embeddings + m.hidden_size + routers  # + final norm


def run_params(cfg: JobConfig, vocab_size: int) -> dict[str, str]:
    """The resolved config flattened (`model.hidden_size`, ...) plus `derived.*` counts, as MLflow strings."""
    values: dict[str, Any] = flatten(cfg.to_dict())
    values["derived.vocab_size"] = vocab_size
    values["derived.num_parameters"] = parameter_count(cfg, vocab_size)
    values["derived.flops_per_token"] = forward_flops_per_token(cfg, vocab_size).total
    values["derived.budget_flops_per_token"] = budget_flops_per_token(cfg).total  # the paper's App. D accounting
    return {k: ("null" if v is None else str(v))[:PARAM_VALUE_LIMIT] for k, v in values.items()}


def git_commit() -> str:
    """Commit of the checkout, else MOR_DIST_GIT_COMMIT (the image's, or set for `ray job submit`), else
    `unknown`."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get(GIT_COMMIT_ENV) or "unknown"


def source_tags(entry_point: str) -> dict[str, str]:
    """Who started the run, from what and at which commit, as the MLflow UI shows them (Source, Created by).

    Taken on the driver: workers run in a Ray session copy without .git, under Ray's user.
    """
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: v for k, v in resolve_tags().items() if k.startswith(("mlflow.user", "mlflow.source."))}
    commit = git_commit()
    tags.update({
        "mlflow.source.name": entry_point,
        "mlflow.project.entryPoint": os.path.basename(entry_point),
        "mlflow.source.git.commit": commit,
        "mor_dist.command": " ".join([entry_point, *sys.argv[1:]])[:PARAM_VALUE_LIMIT],
    })
    return tags


def run_tags(cfg: JobConfig, hosts: int) -> dict[str, str]:
    """Tags that make runs comparable in the MLflow UI."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    return {
        "model_kind": m.kind,
        "routing": cfg.routing.kind if cfg.layout.routed else "none",
        "num_recursions": str(m.num_recursions),
        "sharing": m.sharing if m.kind != "vanilla" else "none",
        "kv": "shared" if cfg.routing.kv_sharing and cfg.layout.routed else "recursion_wise",
        "parallel_layout": f"tp{p.tp}-pp{p.pp}-dp{p.dp}" + ("-sp" if p.sequence_parallel else ""),
        "precision": f"fp8-{t.fp8_recipe}" if t.precision == "fp8" else t.precision,
        "host_count": str(hosts),
    }


def host_count() -> int:
    """Distinct nodes in the job (hostnames gathered from every rank; a collective call)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return len(set(names))
