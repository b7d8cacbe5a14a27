"""Where runs are tracked: the store's URI, the experiment (in the MLflow UI's model-training mode), its artifacts."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

from mor_dist.config import JobConfig
from mor_dist.errors import ConfigError
from mor_dist.location import Where, locate

# The MLflow UI opens an experiment by this tag: without it, an experiment holding no runs yet opens in GenAI mode.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
DEFAULT_EXPERIMENT_ID = "0"
MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the UI's mode switch, as a link's query


class TrackingWarning(RuntimeWarning):
    """Tracking is degraded and training goes on (a RuntimeWarning: jobs and workers silence UserWarnings)."""


def tracking_uri(cfg: JobConfig, run_dir: Where) -> str:
    """tracking.uri, else MLFLOW_TRACKING_URI, else a sqlite store beside the run directory (local storage only:
    sqlite cannot live in an object store)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    storage = locate(run_dir).parent
    if not storage.is_local:
        raise ConfigError(f"run.storage_path={cfg.run.storage_path} is an object store, and MLflow's default sqlite "
                          "store needs a filesystem; set tracking.uri (your MLflow server, e.g. "
                          "tracking.uri=http://mlflow:5000) or MLFLOW_TRACKING_URI, or tracking.enabled=false")
    return f"sqlite:///{(storage.local / 'mlflow.db').resolve()}"


def artifact_location(uri: str, run_dir: Where) -> Optional[str]:
    """Where a new experiment keeps artifacts: beside a sqlite store or a local run directory; a server's (or
    MLflow's) own default otherwise."""
    storage = locate(run_dir).parent
    if uri.startswith(("http://", "https://", "databricks")) or not (uri.startswith("sqlite:///") or storage.is_local):
        return None
    root = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else storage.local
    return (root / "mlflow-artifacts").resolve().as_uri()


def ensure_experiment(client: Any, name: str, uri: str, run_dir: Where) -> str:
    """The id of experiment `name`, created if missing, tagged for model training."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name, artifact_location=artifact_location(uri, run_dir),
                                                     tags=EXPERIMENT_KIND)
        except MlflowException:  # created concurrently by another run
            experiment_id = client.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = experiment.experiment_id
    if experiment is None or any(experiment.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
        for key, value in EXPERIMENT_KIND.items():  # experiments created before the tag existed
            client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def open_store(uri: str) -> Any:
    """An MlflowClient; a sqlite file it creates holds no stray, empty "Default" experiment.

    MLflow adds "Default" to every new database, with its artifacts under the creating process's working
    directory (a Ray session directory on a worker). Only that empty one is removed (a soft delete, which
    `mlflow experiments restore` undoes); servers and existing databases keep theirs.
    """
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table creation notes
    new_file = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()
    client = MlflowClient(tracking_uri=uri)
    if new_file:
        default = client.get_experiment(DEFAULT_EXPERIMENT_ID)
        if default.lifecycle_stage == "active" and not client.search_runs([DEFAULT_EXPERIMENT_ID], max_results=1):
            client.delete_experiment(DEFAULT_EXPERIMENT_ID)
    return client


def prepare_experiment(cfg: JobConfig, run_dir: Where) -> None:
    """On the driver, before workers start: the store and the experiment exist (created here, not in a Ray
    session directory); an unreachable store only warns, as the workers' tracker does."""
    uri = tracking_uri(cfg, run_dir)
    try:
        ensure_experiment(open_store(uri), cfg.tracking.experiment, uri, run_dir)
    except Exception as err:
        warnings.warn(f"MLflow tracking at {uri} is unavailable ({type(err).__name__}: {err}); training goes on, "
                      f"metrics are kept in {run_dir / 'metrics.jsonl'}", TrackingWarning, stacklevel=2)
