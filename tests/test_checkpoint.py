"""Reshardable checkpoints, damaged-checkpoint detection, export, and recovery on Ray."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.errors import ConfigError
from mor_dist.catalog import MANIFEST, checkpoint_dirs, newest_whole, read_manifest, verify
from mor_dist.location import locate
from multiproc import run_world

ROOT = Path(__file__).resolve().parent.parent
BASE = ["train.steps=4", "train.warmup_steps=1", "train.log_interval=1", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.eval_interval=-1", "train.checkpoint_interval=3",
        "tracking.enabled=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from mor_dist.data import padded_vocab_size, prepare_data

    data = prepare_data(load_config(None, BASE), tmp_path_factory.mktemp("cache"))
    return data, padded_vocab_size(data.vocab_size)


@pytest.fixture(scope="module")
def tp2_run(prepared, tmp_path_factory):
    """4 steps at tp=2 with checkpoints after steps 3 and 4."""
    data, vocab = prepared
    out = tmp_path_factory.mktemp("tp2")
    reports = run_world(2, BASE + ["parallel.tp=2"], data.directory, vocab, out)
    return reports, out / "run"


@pytest.mark.parametrize("save,load,world", [("parallel.tp=2", "parallel.tp=1", 1), ("parallel.pp=2", "parallel.pp=1", 1),
                                             ("parallel.tp=2", "parallel.dp=2", 2)])
def test_resharded_resume_continues_like_the_uninterrupted_run(prepared, tmp_path, save, load, world):
    data, vocab = prepared
    saved = run_world(2, BASE + [save], data.directory, vocab, tmp_path / "save")
    resumed = run_world(world, BASE + [load], data.directory, vocab, tmp_path / "load",
                        resume=tmp_path / "save" / "run" / "checkpoint_000003")
    assert [r["step"] for r in resumed] == [4.0]
    assert resumed[0]["lm_loss"] == pytest.approx(saved[-1]["lm_loss"], rel=1e-5)


def test_damaged_checkpoints_are_detected_and_the_previous_one_used(tp2_run, tmp_path):
    _, run_dir = tp2_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest, older = copy / "checkpoint_000004", copy / "checkpoint_000003"
    assert verify(newest) is None and newest_whole(copy).path.local == newest

    shard = max((p for p in newest.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    warnings: list[str] = []
    assert "truncated" in verify(newest)
    assert newest_whole(copy, warn=warnings.append).path.local == older
    assert any("truncated" in w for w in warnings)

    shard.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    assert "corrupted" in verify(newest)
    (newest / MANIFEST.format(1)).unlink()
    assert "rank 1 did not finish" in verify(newest)
    (newest / MANIFEST.format(0)).unlink()
    assert "not completely written" in verify(newest)
    assert newest_whole(copy).path.local == older
    assert "is not a checkpoint directory" in verify(copy / "config.yaml")
    assert f"is a run directory, not a checkpoint; its newest checkpoint is {older}" in verify(copy)


def test_resume_from_a_damaged_checkpoint_is_refused_before_launch(tp2_run, tmp_path):
    from mor_dist.launch import launch

    _, run_dir = tp2_run
    broken = tmp_path / "checkpoint_000003"
    shutil.copytree(run_dir / "checkpoint_000003", broken)
    (broken / MANIFEST.format(0)).unlink()
    with pytest.raises(ConfigError, match="--resume-from"):
        launch(load_config(None, BASE + [f"run.storage_path={tmp_path}"]), resume_from=broken)


def test_resume_into_a_different_model_is_refused_before_launch(tp2_run, tmp_path):
    from mor_dist.launch import launch

    _, run_dir = tp2_run
    cfg = load_config(None, BASE + ["parallel.tp=2", "routing.kind=token_choice", f"run.storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"routing.kind: expert_choice -> token_choice.*run.name=NAME"):
        launch(cfg, resume_from=run_dir / "checkpoint_000004")


def test_a_resumed_run_keeps_its_checkpoints_vocabulary(prepared, tp2_run):
    from mor_dist.launch import vocab_for

    data, vocab = prepared
    _, run_dir = tp2_run
    saved = read_manifest(run_dir / "checkpoint_000004")
    assert saved["vocab_size"] == vocab
    tp1, tp2 = load_config(None, BASE), load_config(None, BASE + ["parallel.tp=2"])
    assert vocab_for(tp1, data.vocab_size, None) == vocab_for(tp2, data.vocab_size, None) == vocab  # any layout
    older = {**saved, "vocab_size": 50432}  # padded by an earlier version for tp=2
    assert vocab_for(tp1, data.vocab_size, older) == 50432  # the embedding keeps the checkpoint's shape
    with pytest.raises(ConfigError, match="does not split over parallel.tp=2"):
        vocab_for(tp2, data.vocab_size, {**saved, "vocab_size": vocab + 1})


def test_export_gives_a_single_file_model_with_the_checkpoint_weights(prepared, tp2_run, tmp_path):
    data, vocab = prepared
    reports, run_dir = tp2_run
    refused = subprocess.run([sys.executable, "jobs/export.py", str(run_dir / "checkpoint_000003"), str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and f"{tmp_path} is a directory" in refused.stderr
    out = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "jobs/export.py", str(run_dir / "checkpoint_000003"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step 3" in done.stdout

    from mor_dist.inference.generation import load_checkpoint

    model, cfg = load_checkpoint(out)
    model.eval()
    assert cfg.parallel.tp == 1
    batches = data.train_iterator(0, 1, 4, 8, cfg.train.seed)
    step4 = [next(batches) for _ in range(8)][6:]  # the weights after step 3 see step 4's batch
    with torch.no_grad():
        losses = [model(b["tokens"], labels=b["labels"]).mean() for b in step4]
    assert float(torch.stack(losses).mean()) == pytest.approx(reports[-1]["lm_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def reference_losses(prepared, tmp_path_factory) -> dict[int, float]:
    """lm_loss by step of an uninterrupted 10-step run (one process, constant LR after one warmup step)."""
    data, vocab = prepared
    reference = run_world(1, BASE + ["train.steps=10", "train.decay_fraction=0", "train.checkpoint_interval=-1"],
                          data.directory, vocab, tmp_path_factory.mktemp("reference"))
    return {int(r["step"]): r["lm_loss"] for r in reference}


def logged_losses(run_dir: Path) -> dict[int, float]:
    """loss/train_lm by step from a run's metrics.jsonl, checking there is one value per step."""
    logged: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/train_lm" in record:
            assert record["step"] not in logged  # one value per step despite the replay
            logged[record["step"]] = record["loss/train_lm"]
    return logged


def pretrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def local_copies(run_dir: Path) -> list[Path]:
    """Local checkpoint copies the run's last launch left in this machine's temp dir."""
    launch = (run_dir / "launch").read_text().strip()
    return list(Path(tempfile.gettempdir()).glob(f"mor-ckpt-{launch}-*"))


@pytest.mark.ray
def test_killed_worker_recovers_and_rerun_continues(reference_losses, tmp_path):
    """A worker dies after step 5 (checkpoint at 3): Ray restarts the group from step 3, saying so, and the run
    finishes; re-running the same command with more steps continues from the last checkpoint. Every logged
    loss equals an uninterrupted run's, and no local checkpoint copy is left behind."""
    common = BASE + ["parallel.tp=2", "train.steps=8", "train.decay_fraction=0", "run.name=recover",
                     "run.max_failures=1", f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=true"]
    first = pretrain(*common, env={"MOR_DIST_FAULT": f"5:1:{tmp_path / 'killed'}"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (tmp_path / "killed").exists()
    console = first.stdout + first.stderr
    assert "worker rank 1 lost: its process died" in console
    assert "restarting the workers from step 3 (restart 1 of run.max_failures=1)" in console
    phases = ["checking storage, cluster and layout", "preparing data: data.dataset=bundled", "MLflow: experiment",
              "starting Ray: a local cluster", "starting 2 CPU worker(s) (tp2 pp1 dp1)", "training steps 1-8"]
    assert [first.stdout.find(p) >= 0 for p in phases] == [True] * len(phases), first.stdout[:3000]
    assert sorted(phases, key=first.stdout.find) == phases  # in the order they happen
    for routine in ("PreemptionWatcher", "Token authentication is enabled", "Megatron-FSDP", "Rerun State Machine",
                    "RerunStateMachine", "GetTimeoutError", "Generating train split"):
        assert routine not in console, routine
    run_dir = tmp_path / "runs" / "recover"
    assert local_copies(run_dir) == []
    again = pretrain(*common, "train.steps=10")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout and "(step 8)" in again.stdout

    logged = logged_losses(run_dir)
    assert sorted(logged) == list(range(1, 11))
    for step, loss in logged.items():
        assert loss == pytest.approx(reference_losses[step], rel=1e-4), step

    from mlflow import MlflowClient  # the MLflow run points at the final checkpoint, which export accepts

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (experiment,) = client.search_experiments()  # no stray "Default" beside it
    assert experiment.name == "mor-dist" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["checkpoint.step"] == "10"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head and run.data.tags["mlflow.source.name"] == "jobs/pretrain.py"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["bundled"]
    assert "system/node_0/cpu_utilization_percentage" in run.data.metrics
    assert verify(Path(run.data.tags["checkpoint.path"])) is None


@pytest.mark.ray
def test_a_run_in_an_object_store_checkpoints_recovers_and_resumes(reference_losses, s3_uri, tmp_path):
    """run.storage_path=s3://... (a local S3-compatible server): checkpoints, the run's files and the prepared data
    go to the bucket; a worker killed after step 5 restarts from the bucket's step-3 checkpoint, a second launch
    resumes from step 6, every loss equals an uninterrupted run's, and no local copy is left behind."""
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = BASE + ["parallel.tp=2", "train.decay_fraction=0", "run.name=s3run", "run.max_failures=1",
                     f"run.storage_path={s3_uri}", "tracking.enabled=true", f"tracking.uri={db}"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "node-cache")}  # the driver's node-local data cache
    first = pretrain(*common, "train.steps=6", env={**env, "MOR_DIST_FAULT": f"5:1:{tmp_path / 'killed'}"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "restarting the workers from step 3" in first.stdout + first.stderr
    assert "an object store (no free space to check)" in first.stdout
    again = pretrain(*common, "train.steps=8", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    storage = locate(s3_uri)
    run_dir = storage / "s3run"
    assert f"resuming from s3://{run_dir.path}/checkpoint_000006_" in again.stdout

    assert sorted(read_manifest(c)["step"] for c in checkpoint_dirs(run_dir) if verify(c) is None) == [3, 6, 8]
    logged: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/train_lm" in record:
            assert record["step"] not in logged
            logged[record["step"]] = record["loss/train_lm"]
    assert sorted(logged) == list(range(1, 9))
    for step, loss in logged.items():
        assert loss == pytest.approx(reference_losses[step], rel=1e-4), step
    (entry,) = (storage / "cache").children()
    assert (entry / "manifest.json").is_file() and (entry / "train.npy").is_file()
    launch_id = (run_dir / "launch").read_text().strip()
    assert list(Path(tempfile.gettempdir()).glob(f"*mor-ckpt-{launch_id}-*")) == []  # lock files included

    from mlflow import MlflowClient

    (run,) = MlflowClient(db).search_runs([e.experiment_id for e in MlflowClient(db).search_experiments()])
    assert run.data.tags["checkpoint.step"] == "8" and run.data.tags["checkpoint.path"].startswith(f"s3://{run_dir.path}/")
    assert verify(run.data.tags["checkpoint.path"]) is None

    # The tools take the bucket's run directory too: its newest whole checkpoint, downloaded once.
    exported = subprocess.run([sys.executable, "jobs/export.py", str(run_dir), str(tmp_path / "model.pt")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "the newest whole checkpoint of s3://" in exported.stderr and "step 8" in exported.stdout
    (copy,) = (tmp_path / "node-cache" / "mor-dist" / "checkpoints" / "s3").rglob("checkpoint_000008_*")
    assert verify(copy) is None and torch.load(tmp_path / "model.pt", weights_only=False)["step"] == 8


def test_prepared_data_in_an_object_store_reaches_another_node(prepared, s3_uri, tmp_path, monkeypatch):
    """The driver's prepared data, shared through the bucket, arrives whole in a node's own cache, once."""
    from mor_dist.data import PreparedData
    from mor_dist.data.cache import fetch, share

    data, _ = prepared
    where = share(data.directory, locate(s3_uri))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-node"))
    local = fetch(where)
    assert local.is_relative_to(tmp_path / "other-node") and PreparedData.open(local).manifest == data.manifest
    assert (local / "train.npy").read_bytes() == (data.directory / "train.npy").read_bytes()
    stamp = (local / "manifest.json").stat().st_mtime_ns
    assert fetch(where) == local and (local / "manifest.json").stat().st_mtime_ns == stamp  # not downloaded again


@pytest.mark.ray
def test_a_kill_while_checkpointing_then_resume_from_an_older_checkpoint(reference_losses, tmp_path):
    """Rank 1 is SIGKILLed after writing its part of step 6's checkpoint, before the upload, with no restart
    allowed: the launch ends with a summary naming the rank and the last checkpoint (step 4). Launching with
    --resume-from the step-2 checkpoint and train.steps=8 starts at step 3, not at the newest; retention keeps
    the checkpoint asked for; the MLflow run forks at step 2; every loss equals an uninterrupted run's."""
    runs = tmp_path / "runs"
    common = BASE + ["parallel.tp=2", "train.checkpoint_interval=2", "run.keep_checkpoints=2", "run.name=ckill",
                     "train.decay_fraction=0", f"run.storage_path={runs}", "tracking.enabled=true"]
    first = pretrain(*common, "train.steps=6", env={"MOR_DIST_FAULT": f"6:1:{tmp_path / 'killed'}:checkpoint"})
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    summary = first.stderr[first.stderr.index("training failed:"):first.stderr.index("details:")]
    run_dir = runs / "ckill"
    by_step = {read_manifest(d)["step"]: d for d in checkpoint_dirs(run_dir) if verify(d) is None}
    assert sorted(by_step) == [2, 4]
    assert "worker rank 1: its process died" in summary and f"last checkpoint: {by_step[4]} (step 4)" in summary
    assert "resume: run the same command again" in summary
    assert local_copies(run_dir) == []  # not even the killed worker's half-written one

    second = pretrain(*common, "train.steps=8", "--resume-from", str(by_step[2]))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from {by_step[2]} (step 2)" in second.stdout
    left = {d.name: verify(d) for d in checkpoint_dirs(run_dir)}
    assert all(problem is None for problem in left.values()), left  # the partial one is gone
    assert sorted(read_manifest(run_dir / name)["step"] for name in left) == [2, 6, 8]  # keep 2, plus the one asked for
    for name in left:  # the step is in the name: checkpoint_000006_<date>_<time>
        assert re.fullmatch(rf"checkpoint_{read_manifest(run_dir / name)['step']:06d}_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d",
                            name), name
    logged = logged_losses(run_dir)
    assert sorted(logged) == list(range(1, 9))
    for step, loss in logged.items():
        assert loss == pytest.approx(reference_losses[step], rel=1e-4), step

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    names = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    current = names.pop("ckill")
    (replaced,) = names.values()
    assert current.data.tags["mor_dist.fork_step"] == "2" and replaced.info.run_name.startswith("ckill (replaced ")
    assert sorted(m.step for m in client.get_metric_history(current.info.run_id, "loss/train_lm")) == list(range(1, 9))
