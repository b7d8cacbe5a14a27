"""KubeRay deployment: render k8s/ kustomizations with kustomize, build the RayJob for a run config, submit and
follow it.

Rendering is kustomize's own (`kustomize build`, or `kubectl kustomize`, which embeds it), so overlays may use
anything kustomize accepts: strategic-merge and JSON6902 patches, images, components, generators.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mor_dist.config import REPO_ROOT, load_config

from mor_dist.errors import ConfigError

OVERLAYS_DIR = REPO_ROOT / "k8s" / "overlays"
PRETRAIN = ("python", "jobs/pretrain.py")
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TERMINAL = ("Complete", "Failed", "ValidationFailed")
MAX_RAYJOB_NAME = 47  # KubeRay rejects longer RayJob names

Doc = dict[str, Any]


class KustomizeError(ValueError):
    """kustomize is missing or refuses a kustomization; the message says which and why."""


class SubmitError(RuntimeError):
    """The cluster refused the RayJob; the message says what to do."""


# ---------------------------------------------------------------- kustomize


def kustomize_command() -> list[str]:
    """`kustomize build` where installed, else `kubectl kustomize` (kubectl embeds kustomize)."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise KustomizeError("rendering k8s/ needs kustomize: install kubectl (>= 1.27, it embeds kustomize v5) or the "
                         "kustomize binary, and put it on PATH")


def render(directory: str | Path) -> list[Doc]:
    """A kustomization directory's resources, as `kubectl apply -k` would create them."""
    command = [*kustomize_command(), str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise KustomizeError(f"`{shlex.join(command)}` failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def dump_all(docs: Sequence[Doc]) -> str:
    """Rendered resources as one YAML stream."""
    return yaml.safe_dump_all(list(docs), sort_keys=False)


# ---------------------------------------------------------------- RayJob for a run


def overlay_path(overlay: str | Path) -> Path:
    """An overlay name under k8s/overlays/, or a directory path."""
    path = Path(overlay)
    if path.is_dir():
        return path
    if (OVERLAYS_DIR / str(overlay)).is_dir():
        return OVERLAYS_DIR / str(overlay)
    names = sorted(p.name for p in OVERLAYS_DIR.iterdir() if p.is_dir())
    raise KustomizeError(f"overlay {overlay!r} is neither a directory nor one of {names} in {OVERLAYS_DIR}")


def overlay_rayjob(overlay: str | Path) -> Doc:
    """The single RayJob an overlay renders."""
    path = overlay_path(overlay)
    jobs = [doc for doc in render(path) if doc["kind"] == "RayJob"]
    if len(jobs) != 1:
        raise KustomizeError(f"{path} renders {len(jobs)} RayJobs; exactly one is needed")
    return jobs[0]


def pretrain_args(entrypoint: str) -> tuple[str, list[str]]:
    """Split `python jobs/pretrain.py --config C overrides...` into C and the overrides."""
    tokens = shlex.split(entrypoint)
    if tuple(tokens[:2]) != PRETRAIN or len(tokens) < 4 or tokens[2] != "--config":
        raise KustomizeError(f"entrypoint must be `{shlex.join(PRETRAIN)} --config <file> [overrides]`, got {entrypoint!r}")
    return tokens[3], tokens[4:]


def merge_overrides(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Dotted overrides: `extra` replaces a `base` entry with the same key in place, else is appended."""
    merged: dict[str, str] = {}
    for item in [*base, *extra]:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        merged[item.split("=", 1)[0].strip()] = item
    return list(merged.values())


def repo_config(config: str | Path) -> str:
    """Repository-relative path of a config file (the image holds the repository); error if missing."""
    path = Path(config)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    found = next((p.resolve() for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"config file {config} does not exist; presets are in {REPO_ROOT / 'configs'}")
    if not found.is_relative_to(REPO_ROOT):
        raise ConfigError(f"config file {found} is outside the repository {REPO_ROOT}; the image only holds "
                          "files of the repository (put it under configs/ and rebuild the image)")
    return found.relative_to(REPO_ROOT).as_posix()


def cluster_gpus(cluster_spec: Doc) -> int:
    """GPUs a RayCluster spec starts: replicas x num-gpus over its worker groups."""
    return sum(int(group.get("replicas", group.get("minReplicas", 0)))
               * int(group.get("rayStartParams", {}).get("num-gpus", "0"))
               for group in cluster_spec.get("workerGroupSpecs", []))


def rayjob_for_run(overlay: str | Path, config: str | None = None, overrides: Sequence[str] = (),
                   name: str | None = None) -> Doc:
    """The overlay's RayJob re-pointed at a run config and extra overrides, after validating the run."""
    config_rel = repo_config(config) if config is not None else None
    job = copy.deepcopy(overlay_rayjob(overlay))
    default_config, base_overrides = pretrain_args(job["spec"]["entrypoint"])
    config_rel = config_rel or repo_config(default_config)
    merged = merge_overrides(base_overrides, overrides)
    cfg = load_config(REPO_ROOT / config_rel, merged)
    gpus = cluster_gpus(job["spec"]["rayClusterSpec"])
    if gpus and cfg.world_size > gpus:
        raise ConfigError(f"the run needs tp*pp*dp = {cfg.world_size} GPUs but overlay {overlay} starts {gpus}; "
                          "change parallel.* or the overlay's worker replicas")
    if not gpus and cfg.parallel.use_gpu == "true":
        raise ConfigError(f"parallel.use_gpu=true but overlay {overlay} has no GPU workers")
    job["spec"]["entrypoint"] = shlex.join([*PRETRAIN, "--config", config_rel, *merged])
    if name is not None:
        if len(name) > MAX_RAYJOB_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
            raise ConfigError(f"RayJob name {name!r} must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
        job["metadata"]["name"] = name
    return job


# ---------------------------------------------------------------- cluster side


def current_namespace() -> str:
    """The namespace of the active kubeconfig context (in a pod: its own), else `default`."""
    from kubernetes import config as kube_config

    try:
        _, active = kube_config.list_kube_config_contexts()
        return active["context"].get("namespace", "default")
    except kube_config.ConfigException:
        token_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return token_ns.read_text().strip() if token_ns.is_file() else "default"


def connect() -> Any:
    """A CustomObjectsApi from the kubeconfig, or from the pod's service account."""
    from kubernetes import client, config as kube_config

    try:
        kube_config.load_kube_config()
    except kube_config.ConfigException:
        kube_config.load_incluster_config()
    return client.CustomObjectsApi()


def submit(api: Any, namespace: str, job: Doc) -> None:
    """Create the RayJob; a name clash becomes a SubmitError that says how to proceed."""
    from kubernetes.client.exceptions import ApiException

    name = job["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    except ApiException as err:
        if err.status == 409:
            raise SubmitError(f"RayJob {name} already exists in namespace {namespace}: pass --name, or "
                              f"`kubectl -n {namespace} delete rayjob {name}` first") from err
        if err.status == 404:
            raise SubmitError("the cluster does not know ray.io/v1 RayJob: install the KubeRay operator") from err
        raise


def mlflow_lines(job: Doc, namespace: str) -> list[str]:
    """Where the run's MLflow server is, from MLFLOW_TRACKING_URI of the head container."""
    env = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])
    uri = next((e.get("value", "") for e in env if e["name"] == "MLFLOW_TRACKING_URI"), "")
    match = re.fullmatch(r"https?://([^:/]+):(\d+)/?", uri)
    if not match:
        return [f"MLflow: {uri or 'MLFLOW_TRACKING_URI not set'}"]
    service, port = match.groups()
    return [f"MLflow: {uri} in the cluster; UI: kubectl -n {namespace} port-forward svc/{service} {port}:{port}"
            f" and open http://localhost:{port}"]


def status_lines(namespace: str, status: Doc) -> list[str]:
    """Where the RayJob's Ray dashboard and job logs are, as far as KubeRay has reported them."""
    cluster = status.get("rayClusterName")
    if not cluster:
        return []
    lines = [f"Ray dashboard: {status.get('dashboardURL') or cluster + '-head-svc:8265'} in the cluster; "
             f"kubectl -n {namespace} port-forward svc/{cluster}-head-svc 8265:8265 and open http://localhost:8265"]
    if status.get("jobId"):
        lines.append(f"logs: ray job logs --address http://localhost:8265 --follow {status['jobId']}")
    return lines


def follow(api: Any, namespace: str, name: str, poll_s: float = 10.0,
           echo: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Print the RayJob's status changes until KubeRay finishes it; True when the Ray job succeeded."""
    last: tuple[str, str] | None = None
    shown: set[str] = set()
    while True:
        status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        state = (status.get("jobDeploymentStatus", ""), status.get("jobStatus", ""))
        if state != last:
            echo(f"{name}: jobDeploymentStatus={state[0] or 'New'} jobStatus={state[1] or '-'}")
            last = state
        for line in status_lines(namespace, status):
            if line not in shown:
                echo(line)
                shown.add(line)
        if state[0] in TERMINAL:
            if status.get("message"):
                echo(f"{name}: {status['message']}")
            return status.get("jobStatus") == "SUCCEEDED"
        sleep(poll_s)
