"""The worker's training loop: parallel setup, model, optimizer, data, steps, reports, checkpoints."""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mor_dist.config import JobConfig, config_from_dict
from mor_dist.data import PreparedData
from mor_dist.data.cache import fetch
from mor_dist.location import Location, locate
from mor_dist.model.flops import forward_flops_per_token
from mor_dist.console import setup_worker_process
from mor_dist.tracking.experiment import tracking_uri
from mor_dist.tracking.metadata import host_count
from mor_dist.tracking.perf import device_peak
from mor_dist.tracking.run_files import RunFiles
from mor_dist.tracking.system import start_node_monitor
from mor_dist.tracking.tracker import Tracker
from mor_dist.catalog import newest_whole, prune
from mor_dist.train.checkpoint import is_disk_full, storage_full, load_checkpoint, save_checkpoint
from mor_dist.train.metrics import reduce_means
from mor_dist.train.step import evaluate, train_step, validation_keys
from mor_dist.train.trainable import Trainable


LOCAL_CHECKPOINT_PREFIX = "mor-ckpt-"  # a launch's local copies: checkpoint parts, the run's files (object stores)


def local_checkpoint_dir(launch: str, step: int) -> Path:
    """A fresh local directory for one rank's part of a checkpoint (Ray uploads it, then deletes it)."""
    return Path(tempfile.mkdtemp(prefix=f"{LOCAL_CHECKPOINT_PREFIX}{launch}-{step}-"))


def remove_local_copies(launch: str) -> None:
    """Local checkpoint copies of a launch left on this node by killed workers or a failed upload."""
    for leftover in Path(tempfile.gettempdir()).glob(f"{LOCAL_CHECKPOINT_PREFIX}{launch}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@dataclass
class Hooks:
    """How the loop talks to its host (Ray Train in production, plain callables in tests)."""

    world_rank: int
    report: Callable[[dict[str, float], Optional[Path]], None]
    # Where this rank writes the checkpoint of a step: a fresh local directory per worker for Ray
    # (report() uploads each worker's files into one storage directory), or one shared directory.
    checkpoint_dir: Callable[[int], Path]
    checkpoint: Optional[Path] = None  # a verified checkpoint directory to resume from
    launch: Optional[str] = None  # the launch's id: checkpoints and the tracker record it
    local_rank: int = 0  # rank on this node: local rank 0 samples the node's system metrics
    node_rank: int = 0  # this node's index in the job (its system metrics' node id)
    tags: dict[str, str] = field(default_factory=dict)  # the launch's MLflow tags (source, commit), from the driver
    dataset: Optional[dict[str, Any]] = None  # the prepared data's manifest, logged as the run's input
    loaded: Callable[[], None] = lambda: None  # called once the checkpoint is loaded (a downloaded copy can go)
    tracking_uri: Optional[str] = None  # the MLflow store the driver chose (None: resolved here, from cfg)


def peak_memory_gib() -> float:
    """Peak device memory (CUDA) or peak resident memory of this process (CPU), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass
class Progress:
    """One line per log interval on the logging rank: step, loss, tokens/s and time left."""

    total: int
    start_step: int
    started: float = field(default_factory=time.perf_counter)

    def line(self, step: int, metrics: dict[str, float]) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        parts = [f"[{bar}] step {step}/{self.total}"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "val_loss" in metrics:
            parts.append(f"val {metrics['val_loss']:.4f}")
        if "val_causal_loss" in metrics:
            parts.append(f"causal {metrics['val_causal_loss']:.4f}")
        parts.append(f"{metrics.get('perf/tokens_per_s', 0.0):,.0f} tok/s")
        parts.append(f"left {time.strftime('%H:%M:%S', time.gmtime(left))}")
        return " | ".join(parts)


def _due(step: int, interval: int, last: int) -> bool:
    """interval -1: never; 0: at the last step only; n: every n steps and at the last."""
    if interval < 0:
        return False
    return step == last or (interval > 0 and step % interval == 0)


def _maybe_inject_fault(step: int, rank: int, phase: str) -> None:
    """Test-only: MOR_DIST_FAULT="step:rank:marker[:phase]" kills that rank's process (SIGKILL) once, after
    that step ("step", the default) or after writing its part of that step's checkpoint, before the upload
    ("checkpoint")."""
    spec = os.environ.get("MOR_DIST_FAULT")
    if not spec:
        return
    at, victim, marker, *when = spec.split(":", 3)
    if step == int(at) and rank == int(victim) and (when or ["step"])[0] == phase and not Path(marker).exists():
        Path(marker).write_text(f"killed rank {rank} at step {step} ({phase})\n")
        os.kill(os.getpid(), signal.SIGKILL)


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _union_keys(local: dict[str, float]) -> list[str]:
    """The same sorted key list on every rank (loss lives on the last stage, router stats on the first)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sorted(local)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(local))
    return sorted(set().union(*gathered))


def _validate(run: Trainable, val_batches: Any, tracker: Optional[Tracker], step: int) -> dict[str, float]:
    """Validation metrics (averaged over ranks): both routing rules' losses, their gap and the perplexity."""
    val_metrics, val_state = evaluate(run, val_batches)
    metrics = reduce_means(val_metrics, validation_keys(run))
    if "val_loss" in metrics:
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    if "val_causal_loss" in metrics:  # what generation's causal routing costs against top-k
        metrics["val_routing_gap"] = metrics["val_causal_loss"] - metrics["val_loss"]
    if tracker is not None:
        tracker.log_validation(step, val_state.tokens, val_state.depths)
    return metrics


def train(cfg: JobConfig, data_dir: Path, vocab_size: int, run_dir: Path, on_cuda: bool, hooks: Hooks) -> None:
    """Train `cfg` on this rank until train.steps, reporting and checkpointing through `hooks`."""
    t = cfg.train
    built = time.perf_counter()
    run = Trainable.build(cfg, vocab_size, on_cuda, pretrained=hooks.checkpoint is None)
    built = time.perf_counter() - built
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    data = PreparedData.open(data_dir)
    batches = data.train_iterator(dp_rank, dp_size, t.micro_batch_size, t.global_batch_size, t.seed,
                                  cfg.data.shuffle_buffer)
    val_batches = data.validation_batches(dp_rank, dp_size, t.micro_batch_size, t.eval_batches)
    seq = cfg.model.seq_length

    step, run_id = 0, None
    if hooks.checkpoint is not None:
        extra, position = load_checkpoint(hooks.checkpoint, run)
        step = extra["step"]
        # Continue the MLflow run only for a checkpoint of this run; starting from another run's gets a new one.
        same_run = extra.get("config", {}).get("run", {}).get("name") == cfg.run.name
        run_id = extra.get("run_id") if same_run else None
        batches.load_state_dict(position)
        hooks.loaded()

    logging_rank = hooks.world_rank == 0
    hosts = host_count()
    peak = device_peak(on_cuda, t.precision)
    uri = hooks.tracking_uri or tracking_uri(cfg, run_dir)
    tracker = Tracker(cfg, run_dir, run_id, vocab_size, hosts, step, hooks.launch, {**hooks.tags, **peak.tags()},
                      hooks.dataset, uri) if logging_rank else None
    run_id = _broadcast(tracker.run_id if tracker else None)  # checkpoints' common state must agree
    monitor = None
    if hooks.local_rank == 0 and cfg.tracking.enabled:
        monitor = start_node_monitor(uri, run_id, cfg.tracking.system_metrics_interval,
                                     hooks.node_rank)
    progress = Progress(t.steps, step)
    flops_per_token = forward_flops_per_token(cfg, vocab_size).training
    tokens_per_step = t.global_batch_size * seq
    keys: Optional[list[str]] = None
    if step == 0 and cfg.model.init_from and t.eval_interval != -1:  # where uptraining starts from
        start = _validate(run, val_batches, tracker, step)
        if tracker is not None:
            tracker.log(start, step)
            print(f"step 0 (model.init_from={cfg.model.init_from}, {cfg.model.init_strategy}): "
                  f"val_loss {start.get('val_loss', float('nan')):.4f}", flush=True)
    if logging_rank:
        print(f"training steps {step + 1}-{t.steps} on {cfg.world_size} worker(s) (model built in {built:.1f}s)",
              flush=True)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < t.steps:
            local = train_step(run, batches)
            step += 1
            _maybe_inject_fault(step, hooks.world_rank, "step")
            window_steps += 1
            log, ev, ck = (_due(step, t.log_interval, t.steps), _due(step, t.eval_interval, t.steps),
                           _due(step, t.checkpoint_interval, t.steps))
            if not (log or ev or ck):
                continue
            keys = keys or _union_keys(local)
            metrics = reduce_means(local, keys)
            # The LM loss lives on the last stage and the router's losses on the first: add after reducing.
            metrics["loss"] = metrics["lm_loss"] + metrics.get("router/aux_loss", 0.0)
            elapsed = time.perf_counter() - window_start
            metrics["perf/tokens_per_s"] = tokens_per_step * window_steps / elapsed
            metrics["perf/tflops_per_s"] = flops_per_token * metrics["perf/tokens_per_s"] / 1e12
            metrics[peak.metric] = peak.mfu(metrics["perf/tflops_per_s"], cfg.world_size)
            metrics["perf/peak_mem_gib"] = reduce_means({"m": peak_memory_gib()}, ["m"])["m"]
            metrics["tokens"] = float(step * tokens_per_step)
            if ev:
                metrics.update(_validate(run, val_batches, tracker, step))
            directory = None
            if ck:
                directory = hooks.checkpoint_dir(step)
                extra = {"step": step, "run_id": run_id, "config": cfg.to_dict(), "vocab_size": vocab_size,
                         "launch": hooks.launch}
                save_checkpoint(directory, run, extra, batches.state_dict())
                _maybe_inject_fault(step, hooks.world_rank, "checkpoint")
            if tracker is not None:
                tracker.log(metrics, step)
                print(progress.line(step, metrics), flush=True)
            hooks.report({"step": float(step), **metrics}, directory)
            window_start, window_steps = time.perf_counter(), 0
    except BaseException:
        if monitor is not None:
            monitor.stop()
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if monitor is not None:
        monitor.stop()
    if tracker is not None:
        tracker.finish()


def _start_point(run_dir: Location, payload: dict[str, Any], restarted: bool) -> Optional[str]:
    """Rank 0: where this attempt starts. The launch's own start (verified by the driver), unless Ray restarted
    the workers after this launch reported a checkpoint: then the newest whole one of this launch."""
    prune(run_dir, payload["keep_checkpoints"], [p for p in [payload["resume_from"]] if p],
          since=payload["launch_time"])  # what a lost attempt left half-written
    start = payload["resume_from"]
    if restarted:
        found = newest_whole(run_dir, launch=payload["launch"])
        start = str(found.path) if found is not None else start
    return start


def _local_start(start: Optional[str], launch: str, local_rank: int) -> tuple[Optional[Path], Callable[[], None]]:
    """The start checkpoint on this node and what to do once it is loaded: a local one is read in place; one in an
    object store is downloaded once per node and removed by the node's first worker after every rank loaded it."""
    if not start:
        return None, lambda: None
    where = locate(start)
    if where.is_local:
        return where.local, lambda: None
    folder = Path(tempfile.gettempdir()) / f"{LOCAL_CHECKPOINT_PREFIX}{launch}-start"  # the copy and its lock
    local = where.copy_once(folder / where.name)

    def loaded() -> None:
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)

    return local, loaded


def _publish(files: RunFiles, close: bool = False) -> None:
    """Upload the run's files (and with `close`, drop the local copy); a storage hiccup only warns: the next
    checkpoint uploads them again, and a lost worker would cost one of run.max_failures."""
    try:
        files.close() if close else files.publish()
    except OSError as err:
        print(f"warning: the run's files did not reach {files.run_dir} ({err}); trying again at the next "
              "checkpoint", flush=True)


def ray_worker(payload: dict[str, Any]) -> None:
    """TorchTrainer entry point: unpack the payload, bind the loop to ray.train."""
    import ray.train
    import ray.train.torch

    setup_worker_process()  # also the runtime env's setup hook; again here for clusters started without it
    cfg = config_from_dict(payload["config"])
    on_cuda = payload["on_cuda"]
    if on_cuda:
        torch.cuda.set_device(ray.train.torch.get_device())
    context = ray.train.get_context()
    run_dir, launch = locate(payload["run_dir"]), payload["launch"]
    files = RunFiles(run_dir, Path(tempfile.gettempdir()) / f"{LOCAL_CHECKPOINT_PREFIX}{launch}-run")
    if context.get_local_rank() == 0:
        remove_local_copies(launch)  # what a killed attempt of this launch left on this node
    # Ray hands a checkpoint to the workers only when it restarts them after this launch reported one
    # (the driver clears the previous launch's record).
    restarted = ray.train.get_checkpoint() is not None
    start = _broadcast(_start_point(run_dir, payload, restarted) if context.get_world_rank() == 0 else None)

    def report(metrics: dict[str, float], directory: Optional[Path]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        # The step in the name (`ls` sorts by it); the time keeps a re-run of a step from reusing a directory.
        name = _broadcast(f"checkpoint_{int(metrics['step']):06d}_{time.strftime('%Y-%m-%d_%H-%M-%S')}") \
            if directory else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                             delete_local_checkpoint_after_upload=True)
        except Exception as err:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            if is_disk_full(err) and run_dir.is_local:
                raise storage_full(run_dir.local, int(metrics["step"])) from err
            raise
        if directory is not None and context.get_world_rank() == 0:
            _publish(files)  # the run's files as of this checkpoint

    logging = context.get_world_rank() == 0
    local_start, loaded = _local_start(start, launch, context.get_local_rank())
    hooks = Hooks(context.get_world_rank(), report, lambda step: local_checkpoint_dir(launch, step), local_start,
                  launch, context.get_local_rank(), context.get_node_rank(), payload["tags"], payload["dataset"],
                  loaded, payload["tracking_uri"])
    try:
        train(cfg, fetch(payload["data_dir"]), payload["vocab_size"], files.pull() if logging else files.local,
              on_cuda, hooks)
    finally:
        if logging:
            _publish(files, close=True)
