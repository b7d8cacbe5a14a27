"""Run lm-evaluation-harness on a mor-dist checkpoint (or a Hugging Face folder) and record the results."""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mor_dist.errors import ConfigError

PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu")
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")


@dataclass
class Evaluation:
    """lm-eval's results per task, plus MoR's mean depth per task and where they were recorded."""

    results: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]
    mean_depth: dict[str, float] = field(default_factory=dict)
    routing: str = "causal"
    checkpoint: Optional[Path] = None  # the training checkpoint evaluated, if the source was one

    def metrics(self) -> dict[str, float]:
        """eval/<task>/<metric> (lm-eval's "acc,none" as "acc", other filters as "acc_<filter>"); eval_topk/...
        under the top-k rule."""
        root = "eval" if self.routing == "causal" else "eval_topk"
        out = {}
        for task, values in self.results.items():
            for key, value in values.items():
                name, _, filt = key.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                    out[f"{root}/{task}/{name if filt in ('', 'none') else f'{name}_{filt}'}"] = float(value)
            if task in self.mean_depth:
                out[f"{root}/{task}/mean_depth"] = self.mean_depth[task]
        return out


def task_names(spec: str) -> list[str]:
    """--tasks: a comma-separated list; `paper` is the paper's seven."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    return [t for name in names for t in (PAPER_TASKS if name == "paper" else (name,))]


def check_tasks(names: list[str], task_manager: Any) -> None:
    """Unknown tasks, and hub tasks without a reachable hub, are refused before any model is loaded."""
    from mor_dist.hub import require_hub

    unknown = [n for n in names if n not in task_manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown}; lm-eval knows {len(task_manager.all_tasks)} (lm_eval "
                          "--tasks list), and --include-path DIR adds local YAML tasks")
    for name in names:
        path = (task_manager.task_index[name].cfg or {}).get("dataset_path")
        if path in LOCAL_LOADERS or (path and Path(path).exists()):
            continue
        try:
            require_hub(f"--tasks {name}", str(path or name))
        except ConfigError as err:
            raise ConfigError(f"--tasks {name} reads its data from the Hugging Face hub, which cannot be reached "
                              f"({err}); offline, write the task as an lm-eval YAML over local JSON/JSONL files and "
                              "pass its folder with --include-path (docs/evaluation.md)") from err


def load_source(source: Path, batch_size: int, routing: str) -> tuple[Any, Optional[Path]]:
    """(lm-eval model, the training checkpoint it came from): mor-dist's own model for a run directory, a
    checkpoint directory or an exported file; lm-eval's `hf` model for a Hugging Face folder."""
    if (source / "config.json").is_file():
        from lm_eval.models.huggingface import HFLM

        if routing != "causal":
            raise ConfigError(f"--routing {routing}: a Hugging Face folder routes with the causal rule only; give "
                              "the run directory or checkpoint for top-k")

        importlib.import_module("mor_dist.hf")  # MoR folders load through the Auto classes

        return HFLM(pretrained=str(source), batch_size=batch_size, device="cpu"), None
    from mor_dist.catalog import resolve_checkpoint
    from mor_dist.data import load_tokenizer
    from mor_dist.evaluation.harness_model import MoRHarnessModel
    from mor_dist.inference.generation import load_checkpoint

    checkpoint = resolve_checkpoint(source) if source.is_dir() else None
    model, cfg = load_checkpoint(checkpoint or source)
    return MoRHarnessModel(model, load_tokenizer(cfg.data.tokenizer), batch_size, routing), checkpoint


def evaluate(source: Path, tasks: list[str], num_fewshot: Optional[int] = None, limit: Optional[float] = None,
             batch_size: int = 8, routing: str = "causal", include_path: Optional[Path] = None) -> Evaluation:
    """Each task through lm_eval.simple_evaluate (one call per task, so MoR's mean depth is per task)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    check_tasks(tasks, manager)
    lm, checkpoint = load_source(source, batch_size, routing)
    out = Evaluation({}, {}, routing=routing, checkpoint=checkpoint)
    for task in tasks:
        before = (getattr(lm, "depth_sum", 0.0), getattr(lm, "depth_tokens", 0))
        done = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=False, bootstrap_iters=0)
        out.results.update(done["results"])
        out.configs.update({name: {"version": done.get("versions", {}).get(name),
                                   "num_fewshot": done.get("n-shot", {}).get(name)} for name in done["results"]})
        if getattr(getattr(lm, "model", None), "routed", False) and lm.depth_tokens > before[1]:
            out.mean_depth[task] = (lm.depth_sum - before[0]) / (lm.depth_tokens - before[1])
    return out


def record(evaluation: Evaluation, source: Path, tasks: list[str]) -> str:
    """Log to the checkpoint's training run in MLflow, or to a new run of experiment mor-dist-eval; returns
    "run <id> at <uri>"."""
    import mlflow

    from mor_dist.catalog import read_manifest
    from mor_dist.config import config_from_dict
    from mor_dist.tracking.experiment import ensure_experiment, open_store, tracking_uri

    checkpoint = evaluation.checkpoint
    manifest = read_manifest(checkpoint) if checkpoint is not None else {}
    run_id, step = manifest.get("run_id"), int(manifest.get("step") or 0)
    run_dir = checkpoint.resolve().parent if checkpoint is not None else Path("runs").resolve() / "evaluations"
    if manifest.get("config"):
        uri = tracking_uri(config_from_dict(manifest["config"]), run_dir)
    else:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    client = open_store(uri)
    if run_id is None:
        experiment_id = ensure_experiment(client, "mor-dist-eval", uri, run_dir)
        run_id = client.create_run(experiment_id, run_name=f"eval-{source.name}",
                                   tags={"source": str(source.resolve())}).info.run_id
        client.set_terminated(run_id)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), step)
                                      for k, v in evaluation.metrics().items()])
    for task, conf in evaluation.configs.items():
        for key, value in conf.items():
            client.set_tag(run_id, f"eval.{task}.{key}", str(value))
    client.set_tag(run_id, f"eval.routing.{evaluation.routing}", "evaluated")
    path = run_dir / f"eval-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tasks": tasks, "routing": evaluation.routing, "results": evaluation.results,
                                "configs": evaluation.configs, "mean_depth": evaluation.mean_depth}, indent=1,
                               default=str))
    client.log_artifact(run_id, str(path), f"eval/{stamp}")
    return f"run {run_id} at {uri}"
