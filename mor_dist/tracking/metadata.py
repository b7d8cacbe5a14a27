"""What identifies a run in MLflow: parameters, tags, metric names, host count."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import torch.distributed as dist

from mor_dist.config import REPO_ROOT, JobConfig, flatten
from mor_dist.model.flops import budget_flops_per_token, forward_flops_per_token, layer_matmul_params

PARAM_VALUE_LIMIT = 500


def metric_name(key: str) -> str:
    """`/`-grouped MLflow name: `val_loss` -> `val/loss`, `loss` -> `train/loss`, grouped names unchanged."""
    if "/" in key:
        return key
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
    """Short commit of the checkout, or `unknown` (e.g. a Ray working_dir copy without .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


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
        "git_commit": git_commit(),
        "host_count": str(hosts),
    }


def host_count() -> int:
    """Distinct nodes in the job (hostnames gathered from every rank; a collective call)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return len(set(names))
