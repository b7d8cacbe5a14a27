"""One MLflow run per training run (logging rank only), with a local JSONL copy of every metric."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from mor_dist.config import JobConfig
from mor_dist.data import Tokenizer, load_tokenizer
from mor_dist.tracking.experiment import (MODEL_TRAINING_VIEW, TrackingWarning, ensure_experiment, open_store,
                                          tracking_uri)
from mor_dist.tracking.lineage import FORK_STEP, FORKED_FROM, REPLACED_BY, copy_history, last_steps, retire
from mor_dist.tracking.dataset import dataset_input
from mor_dist.tracking.run_files import LAUNCH_FILE, METRICS_FILE, REPLACED_FILE, RUN_CONFIG_FILE, VALIDATION_DIR
from mor_dist.tracking.metadata import metric_name, run_params, run_tags
from mor_dist.tracking.validation import depth_metrics, depth_plot, depth_table


def _last_local_steps(path: Path) -> dict[str, int]:
    """Last step of each metric already in a metrics.jsonl."""
    last: dict[str, int] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        step = record.pop("step")
        last.update({key: max(step, last.get(key, step)) for key in record})
    return last


def _unseen(values: dict[str, float], step: int, last: dict[str, int]) -> dict[str, float]:
    """The values not yet logged at or after `step` (a restart replays steps); marks them logged."""
    fresh = {k: v for k, v in values.items() if step > last.get(k, -1)}
    last.update({k: step for k in fresh})
    return fresh


def _cut_local(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step in metrics.jsonl; later ones move to metrics.replaced.jsonl."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= last_step]
    if len(kept) == len(lines):
        return
    with path.with_name(REPLACED_FILE).open("a") as replaced:
        replaced.writelines(line + "\n" for line in lines if json.loads(line)["step"] > last_step)
    path.write_text("".join(line + "\n" for line in kept))


def _same_launch(run_dir: Path, launch: Optional[str]) -> bool:
    """Whether this launch already logged into the run directory (a Ray restart), then record it as the last."""
    marker = run_dir / LAUNCH_FILE
    if launch is None:
        return False
    same = marker.is_file() and marker.read_text().strip() == launch
    marker.write_text(f"{launch}\n")
    return same


class Tracker:
    """MLflow when reachable; metrics always also go to `metrics.jsonl` in the run directory.

    Every metric keeps one value per step. A Ray restart replays steps that its launch already
    logged: the same computation, so those steps are skipped. A new launch that starts before the
    last logged step replaces the later steps: metrics.jsonl moves them to metrics.replaced.jsonl,
    and MLflow continues in a fork of the run (`lineage`).
    """

    def __init__(self, cfg: JobConfig, run_dir: Path, run_id: Optional[str], vocab_size: int, hosts: int = 1,
                 start_step: int = 0, launch: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                 dataset: Optional[dict[str, Any]] = None, uri: Optional[str] = None) -> None:
        """`tags`: the launch's (source, MFU peak); `dataset`: the prepared data's manifest, logged as the input;
        `uri`: the MLflow store (default: resolved from cfg)."""
        self.cfg = cfg
        self.launch_tags = tags or {}
        self.dataset = dataset
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.local = run_dir / METRICS_FILE
        self.start_step = start_step
        self.replace = not _same_launch(run_dir, launch)
        if self.replace:
            _cut_local(self.local, start_step)
        self._local_last = _last_local_steps(self.local)
        self._last: dict[str, int] = {}
        self.run_id: Optional[str] = run_id
        self.uri = uri or tracking_uri(cfg, run_dir)
        self._client: Any = None
        if not cfg.tracking.enabled:
            return
        try:
            self._client = self._start(vocab_size, hosts)
        except Exception as err:  # unreachable server, bad URI, locked store: training goes on
            self._degrade(f"MLflow tracking at {self.uri} is unavailable ({type(err).__name__}: {err})")

    def _start(self, vocab_size: int, hosts: int) -> Any:
        from mlflow.entities import RunTag

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        client = open_store(self.uri)
        tags = {**self.launch_tags, **run_tags(self.cfg, hosts)}
        if self.run_id is None:
            self.run_id = self._create(client, tags, vocab_size)
            return client
        last = last_steps(client, self.run_id)
        if self.replace and any(step > self.start_step for step in last.values()):
            old = self.run_id
            self.run_id = self._create(client, {**tags, FORKED_FROM: old, FORK_STEP: str(self.start_step)},
                                       vocab_size)
            copy_history(client, old, self.run_id, self.start_step)
            retire(client, old, f"a later launch resumed from step {self.start_step}", {REPLACED_BY: self.run_id})
            print(f"MLflow: steps after {self.start_step} are replaced; the run continues as {self.run_id}, the "
                  f"previous one ({old}) keeps its values, renamed as replaced", flush=True)
            self._last = {k: min(v, self.start_step) for k, v in last.items()}
            return client
        client.update_run(self.run_id, status="RUNNING")
        # The layout and hardware may change; who started the run and from which commit stays the first launch's.
        changing = {k: v for k, v in tags.items() if not k.startswith(("mlflow.", "mor_dist.command"))}
        client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in changing.items()])
        self._last = last
        return client

    def _create(self, client: Any, tags: dict[str, str], vocab_size: int) -> str:
        """A new MLflow run with the config's params, the config file and the validation artifacts kept so far."""
        from mlflow.entities import Param

        experiment_id = ensure_experiment(client, self.cfg.tracking.experiment, self.uri, self.run_dir)
        run_id = client.create_run(experiment_id, run_name=self.cfg.run.name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in run_params(self.cfg, vocab_size).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        if self.dataset is not None:
            client.log_inputs(run_id, datasets=[dataset_input(self.dataset)])
        config_file = self.run_dir / RUN_CONFIG_FILE
        config_file.write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        client.log_artifact(run_id, str(config_file))
        for folder in sorted((self.run_dir / VALIDATION_DIR).glob("step_*")):
            if int(folder.name.removeprefix("step_")) <= self.start_step:
                client.log_artifacts(run_id, str(folder), f"{VALIDATION_DIR}/{folder.name}")
        return run_id

    def _degrade(self, reason: str) -> None:
        warnings.warn(f"{reason}; training goes on, metrics are kept in {self.local}", TrackingWarning, stacklevel=3)
        self._client = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log finite metrics under `/`-grouped names at an explicit step (locally always, to MLflow if up)."""
        clean = {metric_name(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        local = _unseen(clean, step, self._local_last)
        if local:
            with self.local.open("a") as f:
                f.write(json.dumps({"step": step, **local}) + "\n")
        if self._client is None:
            return
        fresh = _unseen(clean, step, self._last)
        if not fresh:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in fresh.items()])
        except Exception as err:
            self._degrade(f"MLflow logging failed ({type(err).__name__}: {err})")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (for the example-token table)."""
        return load_tokenizer(self.cfg.data.tokenizer)

    def log_validation(self, step: int, tokens: list[torch.Tensor], depths: list[torch.Tensor]) -> None:
        """Depth metrics, a depth plot and a token table from validation micro-batches [b, s] (MoR only).

        Files go to `validation/step_NNNNNN/` in the run directory and under the same artifact path.
        """
        if not self.cfg.layout.routed or not depths:
            return
        toks, deps = torch.cat(tokens).cpu(), torch.cat(depths).cpu()
        n = self.cfg.model.num_recursions
        self.log(depth_metrics(deps, n), step)
        artifact_path = f"{VALIDATION_DIR}/step_{step:06d}"
        folder = self.run_dir / artifact_path
        folder.mkdir(parents=True, exist_ok=True)
        depth_plot(deps, n, step, folder / "depth_distribution.png")
        depth_table(toks, deps, self.tokenizer, step, folder / "depth_tokens.md")
        if self._client is None:
            return
        try:
            self._client.log_artifacts(self.run_id, str(folder), artifact_path)
        except Exception as err:
            self._degrade(f"MLflow artifact upload failed ({type(err).__name__}: {err})")

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the MLflow run finished (or FAILED: a resume sets it RUNNING again)."""
        if self._client is None:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:
            self._degrade(f"MLflow could not close run {self.run_id} ({type(err).__name__}: {err})")


def tag_checkpoint(uri: str, run_id: str, directory: Path, step: int) -> None:
    """Point the MLflow run at its newest checkpoint (tags checkpoint.path, checkpoint.step); warn if unreachable."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.set_tag(run_id, "checkpoint.path", str(directory))
        client.set_tag(run_id, "checkpoint.step", str(step))
    except Exception as err:
        warnings.warn(f"MLflow run {run_id} at {uri} was not tagged with checkpoint {directory} "
                      f"({type(err).__name__}: {err})", TrackingWarning, stacklevel=2)


def tag_export(uri: str, run_id: str, out: Path, info: dict[str, Any]) -> None:
    """Lead the MLflow run to an export of its model: tags export.<format>.* and, for a Hugging Face folder,
    its config files as artifacts under export/ (the shape and class, readable in the UI)."""
    from mlflow import MlflowClient

    fmt = info["format"]
    try:
        client = MlflowClient(tracking_uri=uri)
        for key, value in {"path": out.resolve(), "step": info["step"], "class": info.get("class"),
                           "params": info.get("params")}.items():
            if value is not None:
                client.set_tag(run_id, f"export.{fmt}.{key}", str(value))
        for name in ("config.json", "generation_config.json"):
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name), "export")
    except Exception as err:
        warnings.warn(f"MLflow run {run_id} at {uri} does not record the export {out} ({type(err).__name__}: {err})",
                      TrackingWarning, stacklevel=2)


def where_to_look(uri: str, run_id: Optional[str]) -> str:
    """How to open a run: its page on an MLflow server, or the `mlflow ui` command for a local store."""
    if not uri.startswith(("http://", "https://")):
        return f"view: mlflow ui --backend-store-uri {uri}"
    if run_id is None:
        return f"open {uri}"
    try:
        from mlflow import MlflowClient

        experiment = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    except Exception as err:  # the server went away after training: say so, with what is known
        return f"open {uri} (run {run_id}; the server did not answer: {type(err).__name__})"
    return f"open {uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?{MODEL_TRAINING_VIEW}"
