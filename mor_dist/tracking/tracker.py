"""One MLflow run per training run (logging rank only), with a local JSONL copy of every metric."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from mor_dist.config import REPO_ROOT, RunConfig, flatten


def tracking_uri(cfg: RunConfig, run_dir: Path) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else a sqlite store beside the run directory."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"


def run_tags(cfg: RunConfig, hosts: int) -> dict[str, str]:
    """Tags that make runs comparable in the MLflow UI."""
    p = cfg.parallel
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "model_kind": cfg.model.kind,
        "routing": cfg.routing.kind if cfg.model.kind == "mor" else "none",
        "num_recursions": str(cfg.model.num_recursions),
        "sharing": cfg.model.sharing if cfg.model.kind != "vanilla" else "none",
        "kv": "shared" if cfg.routing.kv_sharing else "recursion_wise",
        "parallel_layout": f"tp{p.tp}-pp{p.pp}-dp{p.dp}" + ("-sp" if p.sequence_parallel else ""),
        "precision": cfg.train.precision,
        "git_commit": commit,
        "host_count": str(hosts),
    }


class Tracker:
    """MLflow when reachable; metrics always also go to `metrics.jsonl` in the run directory."""

    def __init__(self, cfg: RunConfig, run_dir: Path, run_id: Optional[str], hosts: int = 1) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.local = run_dir / "metrics.jsonl"
        self.run_id: Optional[str] = run_id
        self.uri = tracking_uri(cfg, run_dir)
        self._mlflow = None
        if not cfg.tracking.enabled:
            return
        try:
            self._start(cfg, hosts)
        except Exception as err:  # unreachable server, bad URI, locked store: training goes on
            warnings.warn(f"MLflow tracking at {self.uri} is unavailable ({type(err).__name__}: {err}); "
                          f"metrics are kept in {self.local}")
            self._mlflow = None

    def _start(self, cfg: RunConfig, hosts: int) -> None:
        import mlflow

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            artifacts = (self.run_dir.parent / "mlflow-artifacts").resolve()
            experiment_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts.as_uri())
        else:
            experiment_id = experiment.experiment_id
        client = mlflow.MlflowClient()
        if self.run_id is None:
            run = client.create_run(experiment_id, run_name=cfg.run.name, tags=run_tags(cfg, hosts))
            self.run_id = run.info.run_id
            params = {k: ("null" if v is None else str(v))[:500] for k, v in flatten(cfg.to_dict()).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
            config_file = self.run_dir / "config.yaml"
            config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            client.log_artifact(self.run_id, str(config_file))
        else:
            client.update_run(self.run_id, status="RUNNING")
        self._mlflow = client

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log finite metrics at an explicit step (locally always, to MLflow when available)."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with self.local.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._mlflow is None:
            return
        import mlflow

        try:
            self._mlflow.log_batch(self.run_id, metrics=[
                mlflow.entities.Metric(k, v, int(time.time() * 1000), step) for k, v in clean.items()])
        except Exception as err:
            warnings.warn(f"MLflow logging failed ({err}); metrics stay in {self.local}")
            self._mlflow = None

    def log_validation(self, step: int, tokens: list, depths: list) -> None:
        """Validation-time artifacts from the logging rank's tokens [b, s] and their depths [b, s]."""

    def log_artifact(self, path: Path) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None:
            self._mlflow.set_terminated(self.run_id, status=status)
