"""MLflow tracking: one run with params, tags, metrics by step and artifacts; resume without duplicate
steps; an unreachable server; the comparison script."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

import pytest
import torch
from mlflow import MlflowClient

from mor_dist.config import REPO_ROOT, JobConfig, load_config
from mor_dist.data import padded_vocab_size, prepare_data
from mor_dist.tracking.compare import find_runs
from mor_dist.console import DropCleanerStopTimeout
from mor_dist.tracking.experiment import TrackingWarning
from mor_dist.tracking.metadata import metric_name, source_tags
from mor_dist.tracking.perf import device_peak, vendor_peak
from mor_dist.tracking.validation import depth_metrics
from mor_dist.train.loop import Hooks, train

TINY = ["train.warmup_steps=1", "train.micro_batch_size=4", "train.global_batch_size=4", "model.seq_length=64",
        "train.eval_batches=2"]


class Interrupted(Exception):
    """Stands in for a crashed worker."""


class Runner:
    """Runs the training loop in this process and keeps the checkpoint directories it reports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkpoints: dict[int, Path] = {}

    def config(self, name: str, *overrides: str) -> JobConfig:
        return load_config(None, [*TINY, f"run.name={name}", f"run.storage_path={self.root}", *overrides])

    def __call__(self, cfg: JobConfig, resume: Optional[Path] = None, stop_at: Optional[int] = None,
                 launch: str = "launch-1") -> Path:
        """Train in this process; calls with the same `launch` stand for one launch and Ray's restarts in it."""
        prepared = prepare_data(cfg, self.root / "cache")

        def report(metrics: dict[str, float], directory: Optional[Path]) -> None:
            if directory is not None:
                self.checkpoints[int(metrics["step"])] = directory
            if stop_at is not None and metrics["step"] >= stop_at:
                raise Interrupted

        run_dir = self.root / cfg.run.name
        train(cfg, prepared.directory, padded_vocab_size(prepared.vocab_size), run_dir, False,
              Hooks(0, report, lambda step: Path(tempfile.mkdtemp(prefix=f"ckpt-{step}-", dir=self.root)),
                    resume, launch, 0, 0, source_tags("tests/test_tracking.py"), prepared.manifest))
        return run_dir


@pytest.fixture(scope="module")
def runner(tmp_path_factory, world):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield Runner(tmp_path_factory.mktemp("tracking"))


@pytest.fixture(scope="module")
def tiny_run(runner):
    """Six steps, logged every two, validation and checkpoint at the end, default (sqlite) store (created here)."""
    runner(runner.config("tiny", "train.steps=6", "train.log_interval=2", "tracking.experiment=tiny"))
    client = MlflowClient(tracking_uri=f"sqlite:///{runner.root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    return run


@pytest.fixture(scope="module")
def client(runner, tiny_run) -> MlflowClient:
    """The module's store, once the first run has created it (opening a new sqlite file creates it)."""
    return MlflowClient(tracking_uri=f"sqlite:///{runner.root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def resumed_run(runner, client):
    """Eight steps, interrupted after step 5, resumed from the step-3 checkpoint (steps 4 and 5 replay)."""
    cfg = runner.config("resumed", "train.steps=8", "train.log_interval=1", "train.eval_interval=4",
                        "train.checkpoint_interval=3", "tracking.experiment=resumed")
    with pytest.raises(Interrupted):
        runner(cfg, stop_at=5)
    run_dir = runner(cfg, resume=runner.checkpoints[3])
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    return runs, run_dir


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_tiny_run_logs_params_tags_metrics_and_artifacts(tiny_run, client, runner):
    run = tiny_run
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.hidden_size"] == "64" and params["routing.kind"] == "expert_choice"
    assert params["train.steps"] == "6" and params["tracking.uri"] == "null"
    assert int(params["derived.num_parameters"]) > 0 and float(params["derived.flops_per_token"]) > 0
    tags = run.data.tags
    assert {k: tags[k] for k in ("model_kind", "routing", "num_recursions", "sharing", "parallel_layout",
                                 "precision", "host_count")} == {
        "model_kind": "mor", "routing": "expert_choice", "num_recursions": "3", "sharing": "middle_cycle",
        "parallel_layout": "tp1-pp1-dp1", "precision": "fp32", "host_count": "1"}
    run_id = run.info.run_id
    for key in ("loss/train", "loss/train_lm", "train/lr", "train/grad_norm", "train/tokens", "perf/tokens_per_s",
                "perf/mfu_measured_peak", "perf/peak_mem_gib", "router/r1/mean_weight", "router/r3/selected_frac",
                "router/r2/rule_agreement", "router/r2/bce_loss"):
        assert steps(client, run_id, key) == [2, 4, 6], key
    for key in ("loss/val", "val/ppl", "router/val/dead_token_ratio", "router/val/depth1_reached",
                "router/val/depth3_reached", "router/val/mean_depth", "loss/val_causal", "val/routing_gap"):
        assert steps(client, run_id, key) == [6], key
    gap = run.data.metrics["loss/val_causal"] - run.data.metrics["loss/val"]
    assert run.data.metrics["val/routing_gap"] == pytest.approx(gap) and gap != 0.0  # two rules, two passes
    metrics = run.data.metrics
    assert 0.0 < metrics["perf/mfu_measured_peak"] < 1.0 and "perf/mfu" not in metrics  # no vendor peak on a CPU
    assert tags["mfu.peak_source"] == "measured: fp32 matmul on this CPU" and float(tags["mfu.peak_tflops_per_device"]) > 0
    assert metrics["router/val/depth1_reached"] == 1.0 and 0 < metrics["router/val/depth3_reached"] < 1
    assert metrics["val/ppl"] == pytest.approx(torch.tensor(metrics["loss/val"]).exp().item(), rel=1e-4)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "validation"}
    files = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "validation/step_000006")}
    assert files.keys() == {"depth_distribution.png", "depth_tokens.md"} and min(files.values()) > 1000
    table = Path(client.download_artifacts(run_id, "validation/step_000006/depth_tokens.md",
                                           str(runner.root / "download"))).read_text()
    assert "| position | token | depth |" in table and "mean depth" in table
    local = [json.loads(line) for line in (runner.root / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in local if "loss/train" in r] == [2, 4, 6]


def test_resumed_run_continues_with_one_value_per_step(resumed_run, client):
    runs, run_dir = resumed_run
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    keys = runs[0].data.metrics.keys()
    assert {"loss/train", "loss/val", "perf/mfu_measured_peak", "router/val/dead_token_ratio"} <= keys
    for key in keys:
        logged = steps(client, run_id, key)
        assert len(logged) == len(set(logged)), (key, logged)
    assert steps(client, run_id, "loss/train") == list(range(1, 9))
    assert steps(client, run_id, "loss/val") == [4, 8]
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = Counter((key, r["step"]) for r in local for key in r if key != "step")
    assert max(counts.values()) == 1 and counts[("loss/train", 5)] == 1


def test_a_new_run_from_another_runs_checkpoint_gets_its_own_mlflow_run(resumed_run, runner, client):
    runs, _ = resumed_run
    source = runs[0]
    cfg = runner.config("branch", "train.steps=8", "train.log_interval=1", "train.eval_interval=-1",
                        "train.checkpoint_interval=-1", "tracking.experiment=resumed")
    runner(cfg, resume=runner.checkpoints[6])
    by_name = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("resumed").experiment_id])}
    assert set(by_name) == {"resumed", "branch"}
    branch = by_name["branch"].info.run_id
    assert branch != source.info.run_id and steps(client, branch, "loss/train") == [7, 8]
    assert steps(client, source.info.run_id, "loss/train") == list(range(1, 9))  # the source run is untouched


def test_a_new_launch_that_resumes_before_the_last_logged_step_replaces_the_later_steps(runner, client):
    """Run A logs steps 1-6; launch B resumes A's step-3 checkpoint with train.steps=8, so its learning rate
    at steps 4-6 differs. MLflow continues in a fork holding A's steps 1-3 and B's 4-8; A keeps its values
    under a replaced name; metrics.jsonl holds B's values, A's later ones move to metrics.replaced.jsonl."""
    common = ("train.log_interval=1", "train.eval_interval=-1", "train.checkpoint_interval=3",
              "tracking.experiment=forks", "train.decay_fraction=0.5")
    runner(runner.config("forked", "train.steps=6", *common), launch="A")
    (first,) = client.search_runs([client.get_experiment_by_name("forks").experiment_id])
    run_dir = runner(runner.config("forked", "train.steps=8", *common), resume=runner.checkpoints[3], launch="B")
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("forks").experiment_id])}
    old = runs.pop(first.info.run_id)
    (new,) = runs.values()
    assert new.info.run_name == "forked" and old.info.run_name.startswith("forked (replaced ")
    assert new.data.tags["mor_dist.forked_from"] == old.info.run_id and new.data.tags["mor_dist.fork_step"] == "3"
    assert old.data.tags["mor_dist.replaced_by"] == new.info.run_id

    def values(run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    old_lr, new_lr = values(old.info.run_id, "train/lr"), values(new.info.run_id, "train/lr")
    assert sorted(new_lr) == list(range(1, 9)) and len(client.get_metric_history(new.info.run_id, "train/lr")) == 8
    assert [new_lr[s] for s in (1, 2, 3)] == [old_lr[s] for s in (1, 2, 3)]  # copied, not recomputed
    assert new_lr[6] != old_lr[6]  # B's schedule (8 steps) at step 6, not A's abandoned value
    local = {r["step"]: r["train/lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert local == new_lr
    replaced = [json.loads(line) for line in (run_dir / "metrics.replaced.jsonl").read_text().splitlines()]
    assert {r["step"]: r["train/lr"] for r in replaced} == {s: old_lr[s] for s in (4, 5, 6)}
    assert [r.info.run_id for r in find_runs(client, "forks", [])] == [new.info.run_id]  # compare skips replaced runs


def test_unreachable_tracking_server_warns_and_training_finishes(runner, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = runner.config("offline", "train.steps=2", "train.log_interval=1", f"tracking.uri=http://127.0.0.1:{port}")
    with pytest.warns(TrackingWarning, match=f"127.0.0.1:{port} is unavailable"):
        run_dir = runner(cfg)
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in local if "loss/train" in r] == [1, 2]
    assert any("loss/val" in r for r in local)
    assert (run_dir / "validation" / "step_000002" / "depth_distribution.png").stat().st_size > 1000


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "compare.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_compare_prints_a_table_and_writes_the_plot(tiny_run, resumed_run, runner):
    runs, _ = resumed_run
    plot = runner.root / "compare.png"
    uri = f"sqlite:///{runner.root / 'mlflow.db'}"
    done = compare("--tracking-uri", uri, "--plot", str(plot), "--run-ids", tiny_run.info.run_id, runs[0].info.run_id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "final val loss" in lines[0] and "MFU" in lines[0] and "peak mem GiB" in lines[0]
    assert "mean depth" in lines[0] and re.search(r"\s1\.9\d\s", lines[2])  # MoR-3, top-k: about 2 recursions
    assert lines[2].startswith("tiny ") and lines[3].startswith("resumed ")
    assert "mor expert_choice N_r=3" in lines[2] and "%" in lines[2] and "M " in lines[2]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = compare("--tracking-uri", uri, "--plot", str(plot), "--experiment", "no-such")
    assert missing.returncode == 2 and "no experiment named 'no-such'" in missing.stderr


def test_depth_metrics_and_dead_tokens():
    depths = torch.tensor([[3, 1, 2, 1],
                           [1, 1, 3, 2]])
    out = depth_metrics(depths, 3)
    assert out["router/val/depth1_reached"] == 1.0
    assert out["router/val/depth2_reached"] == pytest.approx(4 / 8)
    assert out["router/val/depth3_reached"] == pytest.approx(2 / 8)
    assert out["router/val/dead_token_ratio"] == pytest.approx(2 / 4)  # positions 1 and 3 never reach depth 3
    assert out["router/val/mean_depth"] == pytest.approx(14 / 8)


def test_metric_names_put_the_losses_first_and_together():
    names = [metric_name(k) for k in ("loss", "lm_loss", "val_loss", "val_causal_loss", "val_ppl", "lr",
                                      "router/r1/mean_weight", "perf/tokens_per_s")]
    assert names == ["loss/train", "loss/train_lm", "loss/val", "loss/val_causal", "val/ppl", "train/lr",
                     "router/r1/mean_weight", "perf/tokens_per_s"]
    sections = sorted({name.split("/")[0] for name in names})  # the MLflow UI sorts its sections by name
    assert sections[0] == "loss"


def test_mfu_divides_by_the_vendor_dense_peak_and_cpus_by_a_measured_one():
    assert vendor_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert vendor_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)  # the longer name wins
    assert vendor_peak("NVIDIA H200", "fp8") == pytest.approx(1978.9e12)
    assert vendor_peak("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert vendor_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 on Ampere
    assert vendor_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    cpu = device_peak(False, "fp32")
    assert cpu is device_peak(False, "fp32") and cpu.flops > 1e8  # measured once per process
    assert cpu.metric == "perf/mfu_measured_peak" and cpu.mfu(cpu.flops / 1e12, 2) == pytest.approx(0.5)


def test_the_tracked_run_shows_in_mlflow_as_model_training_with_source_data_and_system_metrics(tiny_run, client):
    names = [e.name for e in client.search_experiments()]
    assert "tiny" in names and "Default" not in names  # no stray "Default" in a store the run created
    assert client.get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == "custom_model_development"
    tags = tiny_run.data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and len(head) == 40
    assert tags["mlflow.source.name"] == "tests/test_tracking.py" and tags["mlflow.user"]
    (data,) = tiny_run.inputs.dataset_inputs
    assert (data.dataset.name, data.dataset.source_type) == ("bundled", "hugging_face")
    assert json.loads(data.dataset.source)["path"] == "json" and len(data.dataset.digest) == 16
    inputs = {t.key: t.value for t in data.tags}
    assert inputs["mlflow.data.context"] == "training" and int(inputs["train.num_sequences"]) > 0
    system = {k for k in tiny_run.data.metrics if k.startswith("system/")}
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= system
    assert tags["system.node_0"].startswith(f"{socket.gethostname()}: ") and "CPUs" in tags["system.node_0"]


def test_without_a_git_checkout_the_commit_comes_from_the_image(monkeypatch, tmp_path):
    import mor_dist.tracking.metadata as metadata

    monkeypatch.setattr(metadata, "REPO_ROOT", tmp_path)  # like the image: sources without .git
    monkeypatch.setenv("MOR_DIST_GIT_COMMIT", "0123abc")
    assert source_tags("jobs/pretrain.py")["mlflow.source.git.commit"] == "0123abc"
    monkeypatch.delenv("MOR_DIST_GIT_COMMIT")
    assert metadata.git_commit() == "unknown"


def test_only_the_cleaner_timeout_is_dropped_from_the_controller_log():
    import logging

    from ray.exceptions import GetTimeoutError

    def record(error: Exception) -> logging.LogRecord:
        return logging.LogRecord("ray.train", logging.ERROR, __file__, 1, "Failed to stop", (),
                                 (type(error), error, None))

    keep = DropCleanerStopTimeout()
    assert not keep.filter(record(GetTimeoutError("timed out")))
    assert keep.filter(record(RuntimeError("a real failure")))
    assert keep.filter(logging.LogRecord("ray.train", logging.ERROR, __file__, 1, "no exception", (), None))


def test_the_closing_summary_points_at_the_runs_page_on_a_server_and_at_mlflow_ui_for_a_local_store(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from mlflow_screenshots import free_port, mlflow_server  # the screenshots' local server, started the same way
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    from mor_dist.tracking.tracker import where_to_look

    with mlflow_server(free_port(), tmp_path) as uri:
        client = MlflowClient(uri)
        experiment = client.create_experiment("summary")
        run = client.create_run(experiment)
        page = f"open {uri}/#/experiments/{experiment}/runs/{run.info.run_id}?workflowType=machine_learning"
        assert where_to_look(uri, run.info.run_id) == page
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert where_to_look(local, "abc") == f"view: mlflow ui --backend-store-uri {local}"
