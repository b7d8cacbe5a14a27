"""When a run's history is replaced: MLflow runs forked at a step, and retired names.

MLflow cannot delete or overwrite a logged metric value, so a run that resumes before its last
logged step continues in a new MLflow run holding the kept steps (a fork); the old run keeps every
value it had, under a name that says it was replaced, and the two point at each other by tag.
"""

from __future__ import annotations

import time
from typing import Any

FORKED_FROM, FORK_STEP = "mor_dist.forked_from", "mor_dist.fork_step"
REPLACED, REPLACED_BY = "mor_dist.replaced", "mor_dist.replaced_by"  # why a run was replaced; by which fork
BATCH = 1000  # MLflow's limit of metrics per log_batch


def replaced_name(name: str) -> str:
    """The name a replaced run keeps, e.g. `tiny_mor (replaced 2026-12-02 05:31:07)`."""
    return f"{name} (replaced {time.strftime('%Y-%m-%d %H:%M:%S')})"


def retire(client: Any, run_id: str, reason: str, tags: dict[str, str] | None = None) -> None:
    """Rename a run as replaced, tag why, and end it if it still shows as running."""
    run = client.get_run(run_id)
    client.update_run(run_id, name=replaced_name(run.info.run_name))
    for key, value in {REPLACED: reason, **(tags or {})}.items():
        client.set_tag(run_id, key, value)
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")


def copy_history(client: Any, source: str, target: str, last_step: int) -> None:
    """Every metric value of `source` at steps <= last_step, logged again (same steps and times) to `target`."""
    from mlflow.entities import Metric

    kept = [Metric(m.key, m.value, m.timestamp, m.step)
            for key in client.get_run(source).data.metrics
            for m in client.get_metric_history(source, key) if m.step <= last_step]
    for i in range(0, len(kept), BATCH):
        client.log_batch(target, metrics=kept[i:i + BATCH])


def last_steps(client: Any, run_id: str) -> dict[str, int]:
    """The last logged step of each metric of a run."""
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def retire_runs_named(uri: str, experiment: str, name: str, reason: str) -> list[str]:
    """Retire every run of an experiment called `name` (a run started over); returns their ids."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], f"attributes.run_name = '{name}'")
    for run in runs:
        retire(client, run.info.run_id, reason)
    return [run.info.run_id for run in runs]
