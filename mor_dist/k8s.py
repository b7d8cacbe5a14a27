"""KubeRay deployment: render k8s/ kustomizations, build the RayJob for a run config, submit and follow it.

The renderer implements the subset of kustomize that k8s/ uses, and nothing silently: `resources`
(files and directories), `patches` made of JSON6902 operations (add, remove, replace) on a `target`
(group, version, kind, name, namespace, as anchored regular expressions), `images` (name, newName,
newTag, digest, applied to every `containers`/`initContainers` image) and `sortOptions: {order: fifo}`.
For such kustomizations its output equals `kubectl kustomize`; anything else raises KustomizeError.
It is stricter in two places: a patch whose target matches nothing, and a `replace` or `remove` of a
missing path, are errors (kustomize skips the first and turns `replace` into `add`).
"""

from __future__ import annotations

import copy
import re
import shlex
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
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "sortOptions"}
TARGET_FIELDS = ("group", "version", "kind", "name", "namespace")
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}

Doc = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization uses something this renderer does not implement, or a patch does not apply."""


class SubmitError(RuntimeError):
    """The cluster refused the RayJob; the message says what to do."""


# ---------------------------------------------------------------- kustomize subset


def render(directory: str | Path) -> list[Doc]:
    """Build a kustomization directory like `kubectl kustomize` (fifo order)."""
    directory = Path(directory)
    order = _kustomization(directory).get("sortOptions")
    if order != {"order": "fifo"}:
        raise KustomizeError(f"{directory}: set `sortOptions: {{order: fifo}}` (the only order implemented), got {order}")
    return _build(directory)


def _kustomization(directory: Path) -> Doc:
    """Load and check the kustomization file of a directory."""
    for name in ("kustomization.yaml", "kustomization.yml"):
        path = directory / name
        if path.is_file():
            kust = yaml.safe_load(path.read_text()) or {}
            unknown = sorted(set(kust) - KUSTOMIZATION_FIELDS)
            if unknown:
                raise KustomizeError(f"{path}: fields {unknown} are not implemented; use {sorted(KUSTOMIZATION_FIELDS)}")
            return kust
    raise KustomizeError(f"{directory} has no kustomization.yaml")


def _build(directory: Path) -> list[Doc]:
    """Resources of one kustomization with its patches and images applied."""
    kust = _kustomization(directory)
    docs: list[Doc] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        loaded = _build(path) if path.is_dir() else _load_docs(path)
        for doc in loaded:
            if any(_resource_id(doc) == _resource_id(seen) for seen in docs):
                raise KustomizeError(f"{directory}: resource {_resource_id(doc)} is listed twice")
            docs.append(doc)
    for patch in kust.get("patches", []):
        _apply_patch(docs, patch, directory)
    images = kust.get("images", [])
    for image in images:
        if set(image) - IMAGE_FIELDS or "name" not in image or {"newTag", "digest"} <= set(image):
            raise KustomizeError(f"{directory}: image entry {image} needs `name` and newName, newTag or digest (not both)")
    if images:
        for doc in docs:
            _set_images(doc, images)
    return docs


def _load_docs(path: Path) -> list[Doc]:
    """All YAML documents of a resource file."""
    if not path.is_file():
        raise KustomizeError(f"resource {path} does not exist (only local files and directories are implemented)")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _resource_id(doc: Doc) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what kustomize keeps unique."""
    meta = doc.get("metadata", {})
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


def _apply_patch(docs: list[Doc], entry: Doc, directory: Path) -> None:
    """Apply one `patches:` entry (JSON6902 operations) to every resource its target selects."""
    unknown = sorted(set(entry) - {"patch", "path", "target"})
    target = entry.get("target") or {}
    if unknown or not target or set(target) - set(TARGET_FIELDS):
        raise KustomizeError(f"{directory}: patch entries need a target of {TARGET_FIELDS} and patch or path; got {entry}")
    text = entry["patch"] if "patch" in entry else (directory / entry["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise KustomizeError(f"{directory}: only JSON6902 patches (a list of operations) are implemented, not strategic merge")
    selected = [doc for doc in docs if _selected(doc, target)]
    if not selected:
        raise KustomizeError(f"{directory}: patch target {target} matches no resource")
    for doc in selected:
        json_patch(doc, ops)


def _selected(doc: Doc, target: Doc) -> bool:
    """Whether a resource matches a patch target (each field an anchored regular expression)."""
    group, _, version = doc["apiVersion"].rpartition("/")
    meta = doc.get("metadata", {})
    values = {"group": group, "version": version, "kind": doc["kind"],
              "name": meta.get("name", ""), "namespace": meta.get("namespace", "")}
    return all(re.fullmatch(str(target[key]), values[key]) for key in target)


def _pointer(path: str) -> list[str]:
    """RFC 6901 JSON pointer -> unescaped tokens."""
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def json_patch(doc: Doc, ops: Sequence[Doc]) -> None:
    """Apply JSON6902 add, remove and replace operations in place."""
    for op in ops:
        _apply_op(doc, op)


def _apply_op(doc: Doc, op: Doc) -> None:
    """One JSON6902 add, remove or replace, in place."""
    kind, path = op.get("op"), op.get("path", "")
    if kind not in ("add", "remove", "replace"):
        raise KustomizeError(f"JSON6902 op {kind!r} at {path} is not implemented (add, remove, replace)")
    *parents, last = _pointer(path)
    node: Any = doc
    for token in parents:
        try:
            node = node[int(token)] if isinstance(node, list) else node[token]
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise KustomizeError(f"{kind} {path}: {token!r} does not exist in {doc['kind']}/{doc['metadata']['name']}") from err
    value = copy.deepcopy(op.get("value"))
    if isinstance(node, list):
        index = len(node) if (kind == "add" and last == "-") else int(last)
        if not 0 <= index < len(node) + (kind == "add"):
            raise KustomizeError(f"{kind} {path}: index {index} is out of range")
        if kind == "add":
            node.insert(index, value)
        elif kind == "replace":
            node[index] = value
        else:
            del node[index]
        return
    if kind != "add" and last not in node:
        raise KustomizeError(f"{kind} {path}: {last!r} does not exist in {doc['kind']}/{doc['metadata']['name']}")
    if kind == "remove":
        del node[last]
    else:
        node[last] = value


def _set_images(node: Any, images: list[Doc]) -> None:
    """kustomize `images:`: rewrite the image of every container and init container, anywhere."""
    if isinstance(node, list):
        for item in node:
            _set_images(item, images)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                if isinstance(container, dict) and isinstance(container.get("image"), str):
                    container["image"] = _retag(container["image"], images)
        _set_images(value, images)


def _retag(image: str, images: list[Doc]) -> str:
    """Apply the first matching `images:` entry to one image reference."""
    name, at, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    suffix = at + digest
    if colon > slash:
        name, suffix = name[:colon], name[colon:] + suffix
    for entry in images:
        if entry["name"] == name:
            new = entry.get("newName", name)
            if "digest" in entry:
                return f"{new}@{entry['digest']}"
            if "newTag" in entry:
                return f"{new}:{entry['newTag']}"
            return new + suffix
    return image


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
