"""The driver's side of reliability: retention, transient reads, unusable runs, storage checks and early refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mor_dist.config import load_config
from mor_dist.errors import ConfigError
from mor_dist.resume import START_OVER, choose_start, start_fresh
from mor_dist import catalog
from mor_dist.catalog import KEEP, Status, checkpoint_dirs, checksum, inspect, prune, write_manifest
from mor_dist.location import Location, locate

CPU_ONLY = ["train.steps=4", "train.warmup_steps=1", "tracking.enabled=false"]


def fake_checkpoint(path: Path, step: int, saved_at: float, ranks: int = 2, finished: int | None = None) -> Path:
    """A checkpoint directory as the catalog sees one: shards and per-rank manifests (`finished` ranks wrote theirs)."""
    path.mkdir(parents=True)
    for rank in range(ranks):
        (path / f"shard{rank}.bin").write_bytes(os.urandom(256))
    for rank in range(ranks if finished is None else finished):
        files = {f"shard{rank}.bin": list(checksum(path / f"shard{rank}.bin"))}
        write_manifest(path, rank, {"rank": rank, "world_size": ranks, "step": step, "saved_at": saved_at,
                                    "launch": "L", "files": files, "config": None})
    os.utime(path, (saved_at, saved_at))
    return path


def corrupt(checkpoint: Path) -> None:
    shard = checkpoint / "shard0.bin"
    data = shard.read_bytes()
    shard.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Location:
    """Where a test's run directories go: a local folder, or a bucket on a local S3-compatible server."""
    return locate(tmp_path / "storage" if request.param == "local" else request.getfixturevalue("s3_uri"))


def stored(local_run: Path, storage: Location) -> Location:
    """A run directory built locally, copied to the storage under test."""
    (storage / local_run.name).upload(local_run)
    return storage / local_run.name


def test_retention_keeps_the_newest_the_protected_and_the_evidence(tmp_path, storage):
    built = tmp_path / "run"
    for step in range(1, 6):
        fake_checkpoint(built / f"checkpoint_{step}", step, 1000.0 + step)
    (built / "checkpoint_1" / KEEP).write_text("damaged: evidence\n")
    fake_checkpoint(built / "checkpoint_old_partial", 3, 1003.5, finished=1)
    fake_checkpoint(built / "checkpoint_new_partial", 6, 1006.0, finished=0)
    run = stored(built, storage)
    assert inspect(run / "checkpoint_old_partial").status is Status.PARTIAL
    assert inspect(run / "checkpoint_new_partial").status is Status.PARTIAL

    removed = prune(run, keep_newest=2, protect=[run / "checkpoint_2"])
    assert sorted(p.name for p in removed) == ["checkpoint_3", "checkpoint_old_partial"]
    left = sorted(p.name for p in run.children())
    assert left == ["checkpoint_1", "checkpoint_2", "checkpoint_4", "checkpoint_5", "checkpoint_new_partial"]
    # A partial checkpoint newer than every whole one stays, unless the current launch left it (its writer is gone).
    assert prune(run, keep_newest=2, protect=[run / "checkpoint_2"], since=1005.5) == [run / "checkpoint_new_partial"]


def test_a_location_is_what_it_names_not_how_it_is_written(tmp_path, s3_uri):
    """The URI's options in another order name the same place; a symlinked run directory is the directory it
    points to (so --resume-from through the link is still protected), and the MLflow store the workers derive from
    the run directory's text is the driver's."""
    from mor_dist.tracking.experiment import tracking_uri

    base, query = s3_uri.split("?")
    reordered = "&".join(reversed(query.split("&")))
    assert locate(f"{base}/r?{query}") == locate(f"{base}/r?{reordered}") != locate(f"{base}/q?{query}")
    (tmp_path / "a_file").write_text("x")
    assert checkpoint_dirs(tmp_path / "a_file") == [] and checkpoint_dirs(tmp_path / "absent") == []
    with pytest.raises(ConfigError) as err:
        locate(base.replace("s3://", "s3://AKIA1:hunter2@"))
    assert "credentials do not belong in the URI" in str(err.value) and "hunter2" not in str(err.value)

    real = tmp_path / "elsewhere" / "r"
    for step in (1, 2, 3):
        fake_checkpoint(real / f"checkpoint_{step}", step, 1000.0 + step)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(real)
    cfg = load_config(None, CPU_ONLY + ["run.name=r", f"run.storage_path={tmp_path / 'runs'}"])
    run_dir = locate(tmp_path / "runs") / "r"
    start = choose_start(cfg, run_dir, tmp_path / "runs" / "r" / "checkpoint_1", False)
    assert (real / "checkpoint_1" / KEEP).is_file()  # resumed from explicitly: exempt from retention
    assert prune(run_dir, 1, [start.checkpoint]) == [run_dir / "checkpoint_2"] and (real / "checkpoint_1").is_dir()
    assert tracking_uri(cfg, locate(str(run_dir))) == tracking_uri(cfg, run_dir) == \
        f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"


def test_a_directory_is_downloaded_once_however_many_ask(s3_uri, tmp_path, monkeypatch):
    """A node's workers asking at once for the same checkpoint share one download, and the copy is whole."""
    import threading

    built = tmp_path / "ckpt"
    fake_checkpoint(built / "checkpoint_1", 1, 1000.0)
    run = stored(built, locate(s3_uri))
    downloads: list[str] = []
    real = Location.download
    monkeypatch.setattr(Location, "download", lambda self, local: downloads.append(self.path) or real(self, local))
    target = tmp_path / "node" / "checkpoint_1"
    threads = [threading.Thread(target=(run / "checkpoint_1").copy_once, args=(target,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(downloads) == 1 and inspect(target).status is Status.WHOLE
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == ["checkpoint_1"]


def test_transient_read_errors_are_retried_and_never_taken_for_corruption(tmp_path, monkeypatch):
    run = tmp_path / "run"
    good = fake_checkpoint(run / "checkpoint_a", 2, 1000.0)
    real = catalog.checksum
    failures = {"left": 2}

    def flaky(path: Path) -> tuple[int, int]:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(catalog, "checksum", flaky)
    warnings: list[str] = []
    assert inspect(good, warn=warnings.append).status is Status.WHOLE
    assert len(warnings) == 2 and all("retrying" in w for w in warnings)

    failures["left"] = 10**6  # the storage stays down
    down = inspect(good, warn=lambda _: None)
    assert down.status is Status.UNREADABLE and "storage could not read it" in down.problem
    cfg = load_config(None, CPU_ONLY + ["run.name=run", f"run.storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match="none can be resumed") as err:
        choose_start(cfg, run, None, False)
    assert "checkpoint_a (step 2): storage could not read it" in str(err.value)
    assert prune(run, keep_newest=1) == [] and good.is_dir()


def test_each_checkpoint_is_read_once_newest_first(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        fake_checkpoint(run / f"checkpoint_{step}", step, 1000.0 + step)
    read: list[Path] = []
    real = catalog.checksum
    monkeypatch.setattr(catalog, "checksum", lambda path: read.append(path) or real(path))
    cfg = load_config(None, CPU_ONLY + ["run.name=run"])
    start = choose_start(cfg, run, None, False)
    assert start.checkpoint.local == run / "checkpoint_3" and start.step == 3
    assert sorted(p.parent.name for p in read) == ["checkpoint_3", "checkpoint_3"]  # its two shards, nothing else


def test_a_run_with_only_unusable_checkpoints_stops_and_start_over_moves_it_aside(tmp_path, storage):
    built = tmp_path / "r"
    corrupt(fake_checkpoint(built / "checkpoint_a", 3, 1000.0))
    fake_checkpoint(built / "checkpoint_b", 6, 1001.0, finished=1)
    (built / "metrics.jsonl").write_text('{"step": 1, "loss/train": 9.0}\n')
    run = stored(built, storage)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, CPU_ONLY + ["run.name=r", f"run.storage_path={storage}", "tracking.enabled=true",
                                        f"tracking.uri={db}"])
    client = MlflowClient(db)
    old = client.create_run(client.create_experiment("mor-dist", (tmp_path / "art").as_uri()), run_name="r")

    with pytest.raises(ConfigError) as err:
        choose_start(cfg, run, None, False)
    message = str(err.value)
    assert "checkpoint_a (step 3): shard0.bin is corrupted" in message
    assert "checkpoint_b (step 6): lacks manifest.rank1.json" in message and START_OVER in message
    assert "damaged" in (run / "checkpoint_a" / KEEP).read_text()
    assert prune(run, keep_newest=1) == [] and (run / "checkpoint_a").is_dir()  # the evidence stays

    assert choose_start(cfg, run, None, True).checkpoint is None
    start_fresh(cfg, run)
    (moved,) = [p for p in storage.children() if p.name.startswith("r.replaced-")]
    assert not run.exists() and (moved / "metrics.jsonl").is_file()
    assert [p.name for p in moved.children()] == ["checkpoint_a", "checkpoint_b", "metrics.jsonl"]
    renamed = client.get_run(old.info.run_id)
    assert renamed.info.run_name.startswith("r (replaced ") and renamed.info.status == "KILLED"


def test_bad_storage_is_refused_before_anything_starts(tmp_path):
    from mor_dist.launch import launch

    file = tmp_path / "a_file"
    file.write_text("x")
    for path, needle in ((file, "is a file, not a directory"), (file / "below", "is a file, not a directory")):
        with pytest.raises(ConfigError, match=needle):
            launch(load_config(None, CPU_ONLY + [f"run.storage_path={path}"]))


def test_object_store_problems_are_refused_before_anything_starts(s3_uri, monkeypatch):
    """A bucket that is not there, and MLflow's default sqlite store in an object store, are refused by name."""
    from mor_dist.launch import launch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    missing = s3_uri.replace("s3://mor-", "s3://absent-")
    with pytest.raises(ConfigError, match=r"run.storage_path=s3://absent-.* is not writable .*credentials"):
        launch(load_config(None, CPU_ONLY + [f"run.storage_path={missing}"]))
    with pytest.raises(ConfigError, match="MLflow's default sqlite store needs a filesystem; set tracking.uri"):
        launch(load_config(None, CPU_ONLY + [f"run.storage_path={s3_uri}", "tracking.enabled=true"]))


@pytest.fixture
def small_mount(tmp_path):
    """A 6 MiB tmpfs (a real full disk); skipped where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_and_too_small_storage_are_refused(small_mount):
    from mor_dist.storage import check_room, check_writable

    cfg = load_config(None, CPU_ONLY)
    with pytest.raises(ConfigError, match="takes about"):
        check_room(cfg, small_mount, parameters=10**6)  # 12 MB of checkpoint on a 6 MiB disk
    assert "GiB free" in check_room(cfg, small_mount, parameters=10**4)
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    with pytest.raises(ConfigError, match="is not writable .*Read-only"):
        check_writable(small_mount / "runs")


def test_a_full_disk_while_checkpointing_names_the_path_and_leaves_no_partial_files(small_mount, tmp_path):
    from multiproc import run_world

    from mor_dist.data import padded_vocab_size, prepare_data

    overrides = CPU_ONLY + ["train.steps=2", "train.checkpoint_interval=1", "train.micro_batch_size=4",
                            "train.global_batch_size=4"]
    data = prepare_data(load_config(None, overrides), tmp_path / "cache")
    with pytest.raises(Exception) as err:
        run_world(1, overrides, data.directory, padded_vocab_size(data.vocab_size), small_mount / "out")
    assert "no space left on the device holding" in str(err.value) and str(small_mount) in str(err.value)
    assert not list((small_mount / "out" / "run").glob("checkpoint_*"))  # room for the retry


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.use_gpu=true"], "parallel.use_gpu=true but the Ray cluster has no GPUs"),
    (["parallel.dp=64", "train.global_batch_size=512"], "parallel.oversubscribe=true"),
])
def test_layouts_the_local_machine_cannot_run_are_refused_before_data_and_ray(overrides, needle, tmp_path):
    import ray
    import torch

    from mor_dist.launch import launch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine can run these")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n")  # data preparation would fail if it ran first
    cfg = load_config(None, CPU_ONLY + [f"data.dataset={broken}", f"run.storage_path={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=needle):
        launch(cfg)
    assert not ray.is_initialized()


def test_an_unreachable_hub_fails_in_seconds(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from mor_dist.data import prepare_data

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for key in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"data.dataset='someone/corpus' .* 127.0.0.1:{port} cannot be reached"):
        prepare_data(load_config(None, CPU_ONLY + ["data.dataset=someone/corpus"]), tmp_path / "cache")
    assert time.monotonic() - started < 20


def test_reinitialising_model_parallel_does_not_pile_up_threads(world):
    from conftest import thread_count

    from mor_dist.parallel.setup import init_model_parallel

    cfg = load_config(None, [])
    init_model_parallel(cfg.parallel, 1)
    before = thread_count()
    for _ in range(4):
        init_model_parallel(cfg.parallel, 1)
    assert thread_count() <= before + 2


def test_a_lost_node_is_one_restart_line_naming_its_workers_and_the_step_they_restart_from(tmp_path, capsys):
    """Ray Train's controller reports each restart's cause once, with every worker it took (workers that failed only
    because a peer vanished are left out), and the step of the newest checkpoint this launch finished writing,
    whether or not its report arrived before the failure (seen with a node lost in scripts/multinode_check.py)."""
    from ray.exceptions import ActorDiedError

    from mor_dist.supervise import Supervisor

    supervisor = Supervisor(tmp_path, keep_newest=2, protect=[], max_failures=3, start_step=2, launch="L")
    fake_checkpoint(tmp_path / "checkpoint_4", 4, 1000.0)
    fake_checkpoint(tmp_path / "checkpoint_8", 8, 1001.0)  # written and uploaded; no report seen
    fake_checkpoint(tmp_path / "checkpoint_12", 12, 1002.0, finished=1)  # a rank did not finish it
    supervisor.after_exception(None, {3: ActorDiedError(), 2: ActorDiedError(),
                                      0: RuntimeError("Connection reset by peer"), 1: ValueError("bad batch")})
    assert capsys.readouterr().out.splitlines() == [  # by the lowest rank each cause took
        "worker rank 1 lost: ValueError: bad batch; restarting the workers from step 8 (restart 1 of "
        "run.max_failures=3)",
        "worker ranks 2, 3 lost: its process died (killed, out of memory, or its node was lost); restarting the "
        "workers from step 8 (restart 1 of run.max_failures=3)"]
    other = Supervisor(tmp_path, keep_newest=2, protect=[], max_failures=3, start_step=2, launch="another")
    assert other.restart_step() == 2  # an earlier launch's checkpoints are not where this one restarts
