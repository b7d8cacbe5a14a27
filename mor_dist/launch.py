"""Driver side: validate, prepare data, then TorchTrainer / ScalingConfig / RunConfig / FailureConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from mor_dist.config import ConfigError, RunConfig, state_changes

# Reach every worker through the runtime environment (they must be set before CUDA/NCCL start).
WORKER_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "PYTHONWARNINGS": "ignore::UserWarning,ignore::DeprecationWarning,ignore::FutureWarning",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # the logging rank's progress line once, not twice
}


class RunComplete(Exception):
    """The run's latest checkpoint already reached train.steps: nothing to do."""


@dataclass
class LaunchResult:
    """Where a finished run's outputs are."""

    run_dir: Path
    checkpoint: Optional[str]
    tracking_uri: str
    metrics: dict


def run_paths(cfg: RunConfig) -> tuple[Path, Path]:
    """(storage root, run directory) as absolute paths."""
    storage = Path(cfg.run.storage_path).expanduser().resolve()
    return storage, storage / cfg.run.name


def wants_gpu(cfg: RunConfig) -> bool:
    """Resolve parallel.use_gpu against what the cluster offers."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.parallel.use_gpu == "true":
        if gpus < 1:
            raise ConfigError("parallel.use_gpu=true but the Ray cluster has no GPUs; use parallel.use_gpu=false")
        return True
    if cfg.parallel.use_gpu == "false":
        return False
    return gpus >= 1


def check_fits(cfg: RunConfig, on_cuda: bool) -> None:
    """tp*pp*dp workers must fit the cluster before anything starts."""
    import ray

    from mor_dist.model.layers import check_options

    resources = ray.cluster_resources()
    need = cfg.world_size
    kind = "GPU" if on_cuda else "CPU"
    have = int(resources.get(kind, 0))
    if need > have:
        raise ConfigError(
            f"parallel.tp*pp*dp = {cfg.parallel.tp}*{cfg.parallel.pp}*{cfg.parallel.dp} = {need} workers, but the Ray "
            f"cluster has {have} {kind}s; lower parallel.dp/tp/pp or add nodes")
    if not on_cuda:  # GPU-only options on a CPU cluster; GPU checks need the workers' devices
        check_options(cfg, on_cuda=False)


def vocab_for(cfg: RunConfig, tokenizer_vocab: int, saved: Optional[dict]) -> int:
    """The padded vocabulary: a resumed run keeps its checkpoint's (the embedding's shape), else the tokenizer's
    padded to a multiple of 128 * tp, as Megatron does."""
    from mor_dist.data import padded_vocab_size

    if saved is not None and saved.get("vocab_size"):
        vocab = saved["vocab_size"]
        if vocab % cfg.parallel.tp:
            raise ConfigError(f"the checkpoint's padded vocabulary ({vocab}) does not split over parallel.tp="
                              f"{cfg.parallel.tp}; use a parallel.tp that divides it")
        return vocab
    return cfg.model.vocab_size or padded_vocab_size(tokenizer_vocab, cfg.parallel.tp)


def connect_ray(workers: int) -> None:
    """Join the cluster of RAY_ADDRESS / `ray job submit`, else start a local one with room for `workers`."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in WORKER_ENV.items() if k.startswith("RAY_")})
    address = os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {**WORKER_ENV, **{k: v for k, v in os.environ.items() if k.startswith("MOR_DIST_")}}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # A local CPU cluster may oversubscribe cores so that any layout can be tried on a laptop.
        ray.init(num_cpus=max(os.cpu_count() or 1, workers), runtime_env=env, log_to_driver=True)


def launch(cfg: RunConfig, resume_from: Optional[Path] = None) -> LaunchResult:
    """Prepare data on the driver, run the workers, return where the outputs are."""
    import ray.train
    import torch
    from ray.train.torch import TorchConfig, TorchTrainer

    from mor_dist.data import prepare_data
    from mor_dist.model.layers import check_options
    from mor_dist.tracking.tracker import tag_checkpoint, tracking_uri
    from mor_dist.train.checkpoint import latest_valid, manifest, verify

    storage, run_dir = run_paths(cfg)
    if resume_from is not None and (problem := verify(resume_from)) is not None:
        raise ConfigError(f"--resume-from: {problem}")
    if resume_from is None:
        resume_from = latest_valid(run_dir)
    saved = manifest(resume_from) if resume_from is not None else None
    if saved is not None:
        if saved.get("config") is not None and (changes := state_changes(saved["config"], cfg)):
            raise ConfigError(f"{resume_from} holds a different model ({'; '.join(changes)}); set those keys back "
                              "to resume it, or start another run with run.name=NAME")
        step = saved["step"]
        if step >= cfg.train.steps:
            raise RunComplete(f"run '{cfg.run.name}' is already complete at step {step} ({resume_from}); raise "
                              f"train.steps to continue it (train.steps={2 * step}), or start another with "
                              f"run.name=NAME")
        print(f"resuming from {resume_from} (step {step})", flush=True)
    if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
        check_options(cfg, on_cuda=False)  # the local cluster will be CPU-only: refuse GPU options before it starts
    prepared = prepare_data(cfg, storage / "cache")  # bad data fails here, before any worker
    vocab = vocab_for(cfg, prepared.vocab_size, saved)
    connect_ray(cfg.world_size)
    on_cuda = wants_gpu(cfg)
    check_fits(cfg, on_cuda)
    payload = {
        "config": cfg.to_dict(),
        "data_dir": str(prepared.directory),
        "vocab_size": vocab,
        "run_dir": str(run_dir),
        "on_cuda": on_cuda,
        "resume_from": str(resume_from) if resume_from else None,
    }
    from mor_dist.train.loop import ray_worker

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.world_size, use_gpu=on_cuda,
                                               resources_per_worker={"GPU": 1} if on_cuda else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if on_cuda else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # per-report INFO stays in log files
        ),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    uri = tracking_uri(cfg, run_dir)
    if checkpoint is not None and Path(checkpoint).is_dir() and (final := manifest(Path(checkpoint))).get("run_id"):
        tag_checkpoint(uri, final["run_id"], Path(checkpoint), final["step"])
    return LaunchResult(run_dir, checkpoint, uri, dict(result.metrics or {}))
