"""Rendering with kustomize (strategic merge, images, errors) and jobs/submit_k8s.py (dry run, overrides,
submission and following against a stand-in API)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from k8s_manifests import K8S, REPO, TARGETS, Doc, one, rendered
from mor_dist import k8s
from mor_dist.errors import ConfigError


# ---------------------------------------------------------------- kustomize


def test_overlays_may_use_strategic_merge_patches_and_images(tmp_path: Path) -> None:
    """An overlay written the way most users write them (strategic merge, images) is what submit_k8s submits."""
    overlay = tmp_path / "team"
    overlay.mkdir()
    patch = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "mor-pretrain", "labels": {"team": "nlp"}},
             "spec": {"ttlSecondsAfterFinished": 60,
                      "rayClusterSpec": {"headGroupSpec": {"rayStartParams": {"num-cpus": "0"}}}}}
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "cpu-smoke", overlay)], "sortOptions": {"order": "fifo"},
        "patches": [{"patch": yaml.safe_dump(patch)}],
        "images": [{"name": "mor-dist", "newName": "registry.example.com/ml/mor-dist", "newTag": "0.2.0-ray2.60.0"}]}))
    job = k8s.rayjob_for_run(overlay)
    assert job["metadata"]["labels"]["team"] == "nlp" and job["spec"]["ttlSecondsAfterFinished"] == 60
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"] == {"num-gpus": "0", "dashboard-host": "0.0.0.0", "num-cpus": "0"}  # merged
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    images = {c["image"] for g in [head, workers] for c in g["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/ml/mor-dist:0.2.0-ray2.60.0"}
    result = submit_cli("--overlay", str(overlay), "--dry-run")
    assert result.returncode == 0 and yaml.safe_load(result.stdout) == job, result.stderr


def test_kustomize_errors_and_a_missing_kustomize_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "base", tmp_path)],
        "patches": [{"target": {"kind": "RayJob"}, "patch": "- {op: replace, path: /spec/nothing/deeper, value: 1}"}]}))
    with pytest.raises(k8s.KustomizeError, match="kustomize .* failed: .*nothing"):
        k8s.render(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # neither kubectl nor kustomize
    with pytest.raises(k8s.KustomizeError, match="install kubectl"):
        k8s.render(K8S / "base")


# ---------------------------------------------------------------- jobs/submit_k8s.py


def submit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "jobs/submit_k8s.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def needs_config(target: str) -> None:
    config, _ = k8s.pretrain_args(one(rendered(target), "RayJob")["spec"]["entrypoint"])
    if not (REPO / config).is_file():
        pytest.skip(f"{config} is not written yet")


@pytest.mark.parametrize("target", [t for t in TARGETS if t.startswith("overlays/")])
def test_dry_run_prints_the_overlays_rayjob(target: str) -> None:
    needs_config(target)
    result = submit_cli("--overlay", target.split("/")[1], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == one(rendered(target), "RayJob")


def test_dry_run_of_a_missing_config_fails_first() -> None:
    result = submit_cli("--overlay", "no-such-overlay", "--config", "configs/no_such.yaml", "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert "configs/no_such.yaml does not exist" in result.stderr


def test_run_config_and_overrides_reach_the_entrypoint() -> None:
    needs_config("overlays/cpu-smoke")
    job = k8s.rayjob_for_run("cpu-smoke", "configs/tiny_mor.yaml", ["train.steps=20", "parallel.use_gpu=false"], "smoke-2")
    base = one(rendered("overlays/cpu-smoke"), "RayJob")
    assert job["metadata"]["name"] == "smoke-2" and job["spec"]["rayClusterSpec"] == base["spec"]["rayClusterSpec"]
    assert job["spec"]["entrypoint"] == base["spec"]["entrypoint"] + " train.steps=20"
    needs_config("overlays/single-node-8gpu")
    with pytest.raises(ConfigError, match="16 GPUs"):
        k8s.rayjob_for_run("single-node-8gpu", None, ["parallel.dp=16"])


class FakeApi:
    """CustomObjectsApi stand-in: records creations, replays statuses."""

    def __init__(self, statuses: list[Doc], create_error: Exception | None = None) -> None:
        self.statuses, self.create_error, self.created = iter(statuses), create_error, []

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, body: Doc) -> Doc:
        if self.create_error:
            raise self.create_error
        self.created.append((group, version, namespace, plural, body))
        return body

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> Doc:
        return {"status": next(self.statuses)}


def test_submit_and_follow_print_status_and_addresses() -> None:
    job = one(rendered("overlays/cpu-smoke"), "RayJob")
    running = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "mor-pretrain-abcde",
               "dashboardURL": "mor-pretrain-abcde-head-svc.ml.svc.cluster.local:8265", "jobId": "mor-pretrain-x"}
    api = FakeApi([{}, {"jobDeploymentStatus": "Initializing"}, running, running,
                   {**running, "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    k8s.submit(api, "ml", job)
    assert api.created == [("ray.io", "v1", "ml", "rayjobs", job)]
    lines: list[str] = []
    assert k8s.follow(api, "ml", "mor-pretrain", poll_s=0, echo=lines.append, sleep=lambda _: None)
    text = "\n".join(lines)
    assert "kubectl -n ml port-forward svc/mor-pretrain-abcde-head-svc 8265:8265" in text
    assert "jobDeploymentStatus=Complete jobStatus=SUCCEEDED" in text and text.count("jobStatus=RUNNING") == 1
    assert "kubectl -n ml port-forward svc/mor-mlflow 5000:5000" in k8s.mlflow_lines(job, "ml")[0]


def test_follow_reports_failure_and_submit_reports_name_clash() -> None:
    from kubernetes.client.exceptions import ApiException

    api = FakeApi([{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "boom"}])
    lines: list[str] = []
    assert not k8s.follow(api, "ml", "mor-pretrain", poll_s=0, echo=lines.append, sleep=lambda _: None)
    assert lines[-1] == "mor-pretrain: boom"
    with pytest.raises(k8s.SubmitError, match="--name"):
        k8s.submit(FakeApi([], ApiException(status=409)), "ml", one(rendered("base"), "RayJob"))
