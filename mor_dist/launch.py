"""Driver side: check storage and cluster, pick the start, prepare data, then TorchTrainer / ScalingConfig /
JobConfig / FailureConfig."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mor_dist.config import JobConfig
from mor_dist.console import WORKER_SETUP_HOOK, phase, quiet_ray_driver
from mor_dist.errors import ConfigError
from mor_dist.resume import RunComplete, choose_start, start_fresh
from mor_dist.storage import check_room, check_writable
from mor_dist.failures import TrainingFailed, failure_summary
from mor_dist.catalog import prune, read_manifest
from mor_dist.location import Location, Where, locate

# Reach every worker through the runtime environment (they must be set before CUDA/NCCL start).
WORKER_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "PYTHONWARNINGS": "ignore::UserWarning,ignore::DeprecationWarning,ignore::FutureWarning",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # the logging rank's progress line once, not twice
}
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints
__all__ = ["RunComplete", "TrainingFailed", "dry_run", "launch"]


@dataclass
class LaunchResult:
    """Where a finished run's outputs are."""

    run_dir: Location
    checkpoint: Optional[str]
    tracking_uri: str
    metrics: dict
    run_id: Optional[str] = None  # the MLflow run


def run_paths(cfg: JobConfig) -> tuple[Location, Location]:
    """(storage root, run directory): absolute paths, or URIs pyarrow opens."""
    try:
        storage = locate(cfg.run.storage_path)
    except (OSError, ValueError) as err:  # pyarrow refuses unknown options and unreachable stores
        raise ConfigError(f"run.storage_path={cfg.run.storage_path} cannot be opened ({err}); check the URI and its "
                          "options (e.g. s3://bucket/runs?endpoint_override=host:9000&scheme=http)") from err
    return storage, storage / cfg.run.name


def wants_gpu(cfg: JobConfig, gpus: float) -> bool:
    """Resolve parallel.use_gpu against the GPUs the cluster offers."""
    if cfg.parallel.use_gpu == "true":
        if gpus < 1:
            raise ConfigError("parallel.use_gpu=true but the Ray cluster has no GPUs; use parallel.use_gpu=false")
        return True
    if cfg.parallel.use_gpu == "false":
        return False
    return gpus >= 1


def check_fits(cfg: JobConfig, resources: dict[str, float], on_cuda: bool) -> None:
    """tp*pp*dp workers must fit the cluster before anything starts."""
    from mor_dist.model.layers import check_options

    need = cfg.world_size
    kind = "GPU" if on_cuda else "CPU"
    have = int(resources.get(kind, 0))
    if need > have:
        raise ConfigError(
            f"parallel.tp*pp*dp = {cfg.parallel.tp}*{cfg.parallel.pp}*{cfg.parallel.dp} = {need} workers, but the Ray "
            f"cluster has {have} {kind}s; lower parallel.dp/tp/pp or add nodes")
    if not on_cuda:  # GPU-only options on a CPU cluster; GPU checks need the workers' devices
        check_options(cfg, on_cuda=False)


def local_resources(cfg: JobConfig) -> dict[str, float]:
    """What a local cluster will offer: this machine's cores (or one per worker with parallel.oversubscribe) and
    GPUs. Known before it starts, so layouts that do not fit are refused first."""
    import torch

    cores = os.cpu_count() or 1
    if cfg.world_size > cores and not cfg.parallel.oversubscribe:
        raise ConfigError(f"parallel.tp*pp*dp = {cfg.world_size} workers, but this machine has {cores} cores; lower "
                          "parallel.dp/tp/pp, or set parallel.oversubscribe=true to run them anyway (slowly)")
    return {"CPU": float(max(cores, cfg.world_size)), "GPU": float(torch.cuda.device_count())}


def vocab_for(cfg: JobConfig, tokenizer_vocab: int, saved: Optional[dict]) -> int:
    """The padded vocabulary: a resumed run keeps its checkpoint's (the embedding's shape), else model.vocab_size or
    the tokenizer's padded to a multiple of 1024 (the same for every layout). It must split over parallel.tp."""
    from mor_dist.data import padded_vocab_size

    if saved is not None and saved.get("vocab_size"):
        vocab, source = saved["vocab_size"], "the checkpoint's padded vocabulary"
    else:
        vocab, source = cfg.model.vocab_size or padded_vocab_size(tokenizer_vocab), "the padded vocabulary"
    if vocab % cfg.parallel.tp:
        raise ConfigError(f"{source} ({vocab}) does not split over parallel.tp={cfg.parallel.tp}; use a parallel.tp "
                          "that divides it")
    return vocab


def connect_ray(resources: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Join the cluster of RAY_ADDRESS / `ray job submit`, else start a local one with `resources`; what it offers."""
    import ray

    if not ray.is_initialized():
        os.environ.update({k: v for k, v in WORKER_ENV.items() if k.startswith("RAY_")})
        env = {"env_vars": {**WORKER_ENV, **{k: v for k, v in os.environ.items() if k.startswith("MOR_DIST_")}},
               "worker_process_setup_hook": WORKER_SETUP_HOOK}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
        else:
            ray.init(num_cpus=int((resources or {}).get("CPU", os.cpu_count() or 1)), runtime_env=env,
                     log_to_driver=True)
    return ray.cluster_resources()


def dry_run(cfg: JobConfig) -> str:
    """What `--dry-run` prints: layout, depth, parameter counts and FLOPs per token (no Ray, no data)."""
    from mor_dist.data import load_tokenizer
    from mor_dist.model.summary import summarize

    vocab = vocab_for(cfg, load_tokenizer(cfg.data.tokenizer).vocab_size, None)
    return "\n".join(summarize(cfg, vocab).lines(cfg))


def _forget_previous_launch(run_dir: Location) -> None:
    """Each launch is a new Ray Train run in the same directory: the launch decides where it starts, so Ray's
    record of the previous launch's checkpoints must not hand them to this launch's workers."""
    if (run_dir / RAY_SNAPSHOT).exists():
        (run_dir / RAY_SNAPSHOT).remove()


def launch(cfg: JobConfig, resume_from: Optional[Where] = None, start_over: bool = False) -> LaunchResult:
    """Check storage and cluster, pick the start, prepare data on the driver, run the workers."""
    phase(f"run '{cfg.run.name}': checking storage, cluster and layout")
    remote = bool(os.environ.get("RAY_ADDRESS"))
    quiet_ray_driver(local=not remote)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from mor_dist.data import prepare_data
    from mor_dist.data.cache import cache_root, share
    from mor_dist.supervise import Supervisor
    from mor_dist.tracking.experiment import prepare_experiment, tracking_uri
    from mor_dist.tracking.metadata import parameter_count, source_tags
    from mor_dist.tracking.tracker import tag_checkpoint

    storage, run_dir = run_paths(cfg)
    check_writable(storage)
    # Resolved once, here: it refuses MLflow's default sqlite store in an object store before any work, and the
    # workers get it as it is (MLFLOW_TRACKING_URI may be set on the driver only).
    uri = tracking_uri(cfg, run_dir) if cfg.tracking.enabled else None
    if remote:
        phase(f"joining the Ray cluster at {os.environ['RAY_ADDRESS']}")
    resources = connect_ray() if remote else local_resources(cfg)  # joining a cluster is cheap; starting one is not
    on_cuda = wants_gpu(cfg, resources.get("GPU", 0))
    check_fits(cfg, resources, on_cuda)
    start = choose_start(cfg, run_dir, resume_from, start_over)
    if start.checkpoint is not None:
        phase(f"resuming from {start.checkpoint} (step {start.step})")
    what = (f"data.mixture of {len(cfg.data.mixture)} sources" if cfg.data.mixture
            else f"data.dataset={cfg.data.dataset}")
    phase(f"preparing data: {what}, tokenizer {cfg.data.tokenizer}")
    prepared = prepare_data(cfg, cache_root(storage))  # bad data fails here, before any worker
    phase(prepared.describe())
    vocab = vocab_for(cfg, prepared.vocab_size, start.saved)
    phase(check_room(cfg, storage, parameter_count(cfg, vocab)))
    if start.checkpoint is None:
        start_fresh(cfg, run_dir)
    else:
        prune(run_dir, cfg.run.keep_checkpoints, [start.checkpoint])  # partial ones older than a whole one
    if cfg.tracking.enabled:
        phase(f"MLflow: experiment '{cfg.tracking.experiment}' at {uri}")
        prepare_experiment(cfg, run_dir)
    if not remote:
        phase(f"starting Ray: a local cluster with {int(resources['CPU'])} CPUs")
        connect_ray(resources)
    run_dir.mkdir()
    _forget_previous_launch(run_dir)
    protect = [start.checkpoint] if start.checkpoint else []
    payload = {
        "config": cfg.to_dict(),
        "data_dir": share(prepared.directory, storage),
        "dataset": prepared.manifest,
        "tags": source_tags(sys.argv[0]) if cfg.tracking.enabled else {},  # MLflow's context: only when tracked
        "vocab_size": vocab,
        "run_dir": str(run_dir),  # a path or a URI: workers and the controller open it with `locate`
        "on_cuda": on_cuda,
        "resume_from": str(start.checkpoint) if start.checkpoint else None,
        "launch": uuid.uuid4().hex[:12],
        "tracking_uri": uri,
        "launch_time": time.time(),
        "keep_checkpoints": cfg.run.keep_checkpoints,
    }
    from mor_dist.train.loop import ray_worker, remove_local_copies

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.world_size, use_gpu=on_cuda,
                                               resources_per_worker={"GPU": 1} if on_cuda else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if on_cuda else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            # Retention is ours (Supervisor): Ray's would delete an explicit --resume-from and damaged evidence.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            callbacks=[Supervisor(run_dir, cfg.run.keep_checkpoints, protect, cfg.run.max_failures, start.step,
                                  payload["launch"])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # per-report INFO stays in log files
        ),
    )
    p = cfg.parallel
    phase(f"starting {cfg.world_size} {'GPU' if on_cuda else 'CPU'} worker(s) (tp{p.tp} pp{p.pp} dp{p.dp}); each "
          "builds its part of the model")
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise failure_summary(err, run_dir) from err
    finally:
        remove_local_copies(payload["launch"])  # what this node's killed workers left
    checkpoint = run_dir / Path(result.checkpoint.path).name if result.checkpoint is not None else None
    run_id = None
    if checkpoint is not None and checkpoint.is_dir() and (final := read_manifest(checkpoint)).get("run_id"):
        run_id = final["run_id"]
        tag_checkpoint(uri, run_id, checkpoint, final["step"])
    return LaunchResult(run_dir, str(checkpoint) if checkpoint else None, uri or "", dict(result.metrics or {}),
                        run_id)
