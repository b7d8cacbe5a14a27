"""KubeRay manifests: schemas (strict, against the CRDs), project rules (GPUs, volumes, MLflow, security) and the
Dockerfile. Rendering and submission: test_submit_k8s.py."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from k8s_manifests import CONFIGS, K8S, REPO, SOURCES, TARGETS, Doc, load_source, one, rendered
from mor_dist import k8s
from mor_dist.config import load_config

K8S_VERSION = "1.30.0"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- schemas


def crd_dir() -> Path | None:
    """KUBERAY_CRD_DIR, else ../shared/schemas/kuberay next to the repository."""
    for candidate in (os.environ.get("KUBERAY_CRD_DIR"), REPO.parent / "shared" / "schemas" / "kuberay"):
        if candidate and (Path(candidate) / "ray.io_rayjobs.yaml").is_file():
            return Path(candidate)
    return None


def strict(node: Any) -> None:
    """openapi2jsonschema's transforms: unknown keys rejected, int-or-string accepts both."""
    if isinstance(node, list):
        for item in node:
            strict(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for value in node.values():
        strict(value)


@functools.cache
def _crd_validators(directory: Path) -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.load((directory / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
        strict(schema)
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


def ray_validators() -> dict[str, jsonschema.protocols.Validator]:
    """Validators for ray.io/v1 kinds, or skip naming KUBERAY_CRD_DIR."""
    directory = crd_dir()
    if directory is None:
        pytest.skip("KubeRay CRDs not found in ../shared/schemas/kuberay; set KUBERAY_CRD_DIR to a folder "
                    "holding ray.io_rayclusters.yaml and ray.io_rayjobs.yaml")
    return _crd_validators(directory)


def where(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def ray_schema_errors(doc: Doc) -> list[str]:
    """jsonschema errors of a ray.io/v1 resource against its strict CRD schema."""
    validator = ray_validators()[doc["kind"]]
    return [f"{where(doc)} /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def core_schema_errors(doc: Doc) -> list[str]:
    """kubernetes-validate (strict) errors of a core resource."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{where(doc)} /{'/'.join(map(str, err.path))}: {err.message}"]
    return []


@pytest.mark.parametrize("source", SOURCES)
def test_core_kinds_validate(source: str) -> None:
    docs = [d for d in load_source(source) if not d["apiVersion"].startswith("ray.io/")]
    assert [e for d in docs for e in core_schema_errors(d)] == []


@pytest.mark.parametrize("source", SOURCES)
def test_ray_kinds_validate_against_crds(source: str) -> None:
    docs = [d for d in load_source(source) if d["apiVersion"].startswith("ray.io/")]
    assert all(d["apiVersion"] == "ray.io/v1" for d in docs)
    assert [e for d in docs for e in ray_schema_errors(d)] == []


@pytest.mark.parametrize("file, old, new, check", [
    ("rayjob.yaml", "workerGroupSpecs:", "workerGroupSpec:", ray_schema_errors),
    ("raycluster.yaml", "mountPath: /dev/shm", "mountpath: /dev/shm", ray_schema_errors),
    ("mlflow.yaml", "  replicas: 1", "  replica: 1", core_schema_errors),
])
def test_misspelled_field_fails_with_its_name(tmp_path: Path, file: str, old: str, new: str,
                                              check: Callable[[Doc], list[str]]) -> None:
    text = (K8S / "base" / file).read_text()
    assert old in text
    broken = tmp_path / file
    broken.write_text(text.replace(old, new, 1))
    errors = [e for d in yaml.safe_load_all(broken.read_text()) for e in check(d)]
    field = new.strip().split(":")[0]
    assert any(f"'{field}'" in e for e in errors), errors


def test_int_or_string_accepts_integers_and_strings_only() -> None:
    job = one(rendered("base"), "RayJob")
    resources = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["cpu"] = 64
    assert ray_schema_errors(job) == []
    resources["limits"]["cpu"] = [64]
    assert any("limits/cpu" in e for e in ray_schema_errors(job))


# ---------------------------------------------------------------- project rules


def containers(pod: Doc) -> list[Doc]:
    return pod.get("containers", []) + pod.get("initContainers", [])


def env_of(container: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def storage_path(docs: list[Doc]) -> str | None:
    """run.storage_path of the RayJob's entrypoint."""
    job = next((d for d in docs if d["kind"] == "RayJob"), None)
    found = re.search(r"(?:^|\s)run\.storage_path=(\S+)", job["spec"]["entrypoint"]) if job else None
    return found.group(1) if found else None


def cluster_specs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    """(where, RayCluster spec) of every RayCluster and every RayJob's embedded cluster."""
    specs = [(where(d), d["spec"]) for d in docs if d["kind"] == "RayCluster"]
    return specs + [(where(d) + " rayClusterSpec", d["spec"]["rayClusterSpec"]) for d in docs if d["kind"] == "RayJob"]


def group_problems(at: str, group: Doc, version: str, mount: str | None, pvcs: set[str]) -> list[str]:
    """GPU counts, /dev/shm, image, env and checkpoint volume of one head or worker group."""
    problems = []
    pod = group["template"]["spec"]
    ray_container = pod["containers"][0]
    resources = ray_container.get("resources", {})
    counts = (resources.get("requests", {}).get(GPU, 0), resources.get("limits", {}).get(GPU, 0),
              group.get("rayStartParams", {}).get("num-gpus"))
    if counts[2] is None or len({int(c) for c in counts}) != 1:
        problems.append(f"{at}: {GPU} request {counts[0]}, limit {counts[1]} and rayStartParams num-gpus {counts[2]} differ")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in containers(pod):
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir", {}).get("medium") != "Memory":
            problems.append(f"{at} {container['name']}: /dev/shm is not a Memory emptyDir")
        tag = re.search(r":[^/:@]*ray(\d+\.\d+)", container["image"])
        if not tag or tag.group(1) != RAY_MINOR or version != RAY_MINOR:
            problems.append(f"{at} {container['name']}: image {container['image']} and rayVersion {version} "
                            f"must carry the installed Ray {RAY_MINOR}")
        if mount is None or volumes.get(mounts.get(mount), {}).get("persistentVolumeClaim", {}).get("claimName") not in pvcs:
            problems.append(f"{at} {container['name']}: no PersistentVolumeClaim of the kustomization mounted at "
                            f"run.storage_path {mount}")
    env = env_of(ray_container)
    if env.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1" or not any(name.startswith("NCCL_") for name in env):
        problems.append(f"{at}: NCCL_* and CUDA_DEVICE_MAX_CONNECTIONS=1 belong in the container env")
    if not env.get("MLFLOW_TRACKING_URI"):
        problems.append(f"{at}: MLFLOW_TRACKING_URI is not set")
    return problems


def cluster_problems(at: str, spec: Doc, mount: str | None, pvcs: set[str]) -> list[str]:
    """Head is CPU-only with the dashboard; every group passes group_problems; replica bounds hold."""
    problems = []
    version = ".".join(str(spec.get("rayVersion", "")).split(".")[:2])
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-gpus") != "0" or head.get("rayStartParams", {}).get("dashboard-host") != "0.0.0.0":
        problems.append(f"{at}: the head must be CPU-only (num-gpus \"0\") with the dashboard on 0.0.0.0")
    problems += group_problems(f"{at} head", head, version, mount, pvcs)
    for group in spec.get("workerGroupSpecs", []):
        name = f"{at} {group['groupName']}"
        problems += group_problems(name, group, version, mount, pvcs)
        bounds = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if None in bounds or not bounds[0] <= bounds[1] <= bounds[2]:
            problems.append(f"{name}: needs minReplicas <= replicas <= maxReplicas, got {bounds}")
    return problems


def rayjob_problems(job: Doc) -> list[str]:
    """Submission mode, lifecycle and entrypoint of a RayJob."""
    spec, at = job["spec"], where(job)
    problems = []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES or mode != "HTTPMode":
        problems.append(f"{at}: submissionMode {mode} must be HTTPMode (allowed: {sorted(SUBMISSION_MODES)})")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append(f"{at}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if not spec.get("shutdownAfterJobFinishes") or spec.get("backoffLimit", 0) < 1:
        problems.append(f"{at}: needs shutdownAfterJobFinishes: true and backoffLimit >= 1 (cluster-level retries)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) or len(job["metadata"]["name"]) > 47:
        problems.append(f"{at}: the name must be a DNS-1035 label of at most 47 characters")
    if not re.fullmatch(r"python jobs/pretrain\.py --config configs/\S+\.yaml( \S+=\S*)*", spec.get("entrypoint", "")):
        problems.append(f"{at}: entrypoint must be `python jobs/pretrain.py --config configs/<x>.yaml [overrides]`")
    if not (storage_path(docs=[job]) or "").startswith("/"):
        problems.append(f"{at}: entrypoint must pass run.storage_path=<mount path>")
    return problems


def mlflow_problems(docs: list[Doc]) -> list[str]:
    """MLFLOW_TRACKING_URI names a Service that selects an `mlflow server` with sqlite and artifacts on a volume."""
    uris = {env_of(c).get("MLFLOW_TRACKING_URI") for _, spec in cluster_specs(docs)
            for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])] for c in g["template"]["spec"]["containers"]}
    found = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", uris.pop()) if len(uris) == 1 else None
    if not found:
        return [f"all Ray containers need one MLFLOW_TRACKING_URI http://<service>:<port>, got {uris}"]
    service = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == found.group(1)), None)
    if service is None or int(found.group(2)) not in [p["port"] for p in service["spec"]["ports"]]:
        return [f"MLFLOW_TRACKING_URI {found.group(0)} does not name a Service port of the kustomization"]
    deployment = next((d for d in docs if d["kind"] == "Deployment" and service["spec"]["selector"].items()
                       <= d["spec"]["template"]["metadata"]["labels"].items()), None)
    if deployment is None:
        return [f"Service {service['metadata']['name']} selects no Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    command = " ".join(pod["containers"][0].get("command", []) + pod["containers"][0].get("args", []))
    mounts = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])]
    paths = re.fullmatch(r"mlflow server --backend-store-uri sqlite:///(/\S+) --artifacts-destination (/\S+) "
                         r"--host 0\.0\.0\.0 --port \d+", command)
    shared = re.fullmatch(r"mlflow server --backend-store-uri postgresql\+psycopg2://\S+ --artifacts-destination s3://\S+ "
                          r"--app-name basic-auth --host 0\.0\.0\.0 --port \d+", command)  # many users: database, bucket, login
    if shared:
        login = env_of(pod["containers"][0]).get("MLFLOW_AUTH_CONFIG_PATH", "")
        if not any(login.startswith(m + "/") for m in mounts):
            return [f"{where(deployment)}: MLFLOW_AUTH_CONFIG_PATH={login!r} is not in a mounted volume {mounts}"]
        return []
    if not paths or not all(any(p.startswith(m + "/") for m in mounts) for p in paths.groups()):
        return [f"{where(deployment)}: needs `mlflow server --backend-store-uri sqlite:///<volume>/... "
                f"--artifacts-destination <volume>/... --host 0.0.0.0` (or PostgreSQL, S3 and a login), got {command!r} "
                f"with mounts {mounts}"]
    return []


CREDENTIAL = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|ACCESS_KEY|API_KEY|CREDENTIAL", re.IGNORECASE)
PASSWORD_IN_URI = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def pod_templates(docs: list[Doc]) -> list[tuple[str, Doc]]:
    """(where, pod spec) of every Deployment and every Ray head and worker group."""
    pods = [(where(d), d["spec"]["template"]["spec"]) for d in docs if d["kind"] == "Deployment"]
    for at, spec in cluster_specs(docs):
        pods += [(f"{at} {g.get('groupName', 'head')}", g["template"]["spec"])
                 for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]
    return pods


def security_problems(docs: list[Doc]) -> list[str]:
    """No container runs as root or may escalate; credentials only by Secret reference; Ray token auth on;
    GCS fault tolerance's password from a Secret; lost workers restarted (run.max_failures >= 1)."""
    problems = []
    for at, pod in pod_templates(docs):
        for container in containers(pod):
            name = f"{at} {container['name']}"
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            if not context.get("runAsNonRoot") or context.get("runAsUser") in (None, 0):
                problems.append(f"{name}: runs as root (needs runAsNonRoot: true and a non-zero runAsUser)")
            if context.get("allowPrivilegeEscalation", True):
                problems.append(f"{name}: needs allowPrivilegeEscalation: false")
            for entry in container.get("env", []):
                if "value" in entry and (CREDENTIAL.search(entry["name"]) or PASSWORD_IN_URI.search(str(entry["value"]))):
                    problems.append(f"{name}: credential {entry['name']} in plain text; use valueFrom.secretKeyRef")
            if any(PASSWORD_IN_URI.search(str(arg)) for arg in container.get("command", []) + container.get("args", [])):
                problems.append(f"{name}: a password in a command-line URI")
    problems += [f"{where(d)}: a Secret with its data in the manifests" for d in docs
                 if d["kind"] == "Secret" and (d.get("data") or d.get("stringData"))]
    for at, spec in cluster_specs(docs):
        if spec.get("authOptions", {}).get("mode") != "token":
            problems.append(f"{at}: Ray token authentication is off (authOptions.mode: token)")
    for cluster in (d for d in docs if d["kind"] == "RayCluster"):
        password = cluster["spec"].get("gcsFaultToleranceOptions", {}).get("redisPassword", {})
        if "secretKeyRef" not in password.get("valueFrom", {}):
            problems.append(f"{where(cluster)}: needs gcsFaultToleranceOptions with the Redis password from a Secret")
    for job in (d for d in docs if d["kind"] == "RayJob"):
        found = re.search(r"(?:^|\s)run\.max_failures=(\d+)", job["spec"]["entrypoint"])
        if not found or int(found.group(1)) < 1:
            problems.append(f"{where(job)}: run.max_failures must be >= 1 on a cluster")
    return problems


def consistency_problems(docs: list[Doc]) -> list[str]:
    """The interactive RayCluster and the RayJob's cluster run the same pods (replica counts aside)."""
    def pods(spec: Doc) -> Doc:
        groups = {g["groupName"]: (g.get("rayStartParams"), g["template"]) for g in spec.get("workerGroupSpecs", [])}
        head = spec["headGroupSpec"]
        return {"rayVersion": spec.get("rayVersion"), "head": (head.get("rayStartParams"), head["template"]), **groups}
    specs = cluster_specs(docs)
    return [f"{at} differs from {specs[0][0]} in its pods or rayVersion"
            for at, spec in specs[1:] if pods(spec) != pods(specs[0][1])]


def problems(docs: list[Doc]) -> list[str]:
    """Every project rule the schemas cannot express."""
    mount = storage_path(docs)
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    found = [p for at, spec in cluster_specs(docs) for p in cluster_problems(at, spec, mount, pvcs)]
    found += [p for d in docs if d["kind"] == "RayJob" for p in rayjob_problems(d)]
    return found + mlflow_problems(docs) + consistency_problems(docs) + security_problems(docs)


@pytest.mark.parametrize("target", TARGETS)
def test_project_rules_hold(target: str) -> None:
    docs = rendered(target)
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim"}
    assert problems(docs) == []


def _set(path: str, value: Any, kind: str = "RayJob") -> Callable[[list[Doc]], None]:
    """A mutation of the rendered base: set one JSON-pointer path of its RayJob (or another kind); `-` appends."""
    def mutate(docs: list[Doc]) -> None:
        *parents, last = path.lstrip("/").split("/")
        node: Any = one(docs, kind)
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token.replace("~1", "/")]
        if last == "-":
            node.append(value)
        else:
            node[int(last) if isinstance(node, list) else last.replace("~1", "/")] = value
    return mutate


WORKER = "/spec/rayClusterSpec/workerGroupSpecs/0"
POD = f"{WORKER}/template/spec"
GPU_KEY = GPU.replace("/", "~1")


@pytest.mark.parametrize("mutate, expected", [
    (_set(f"{POD}/containers/0/resources/limits/{GPU_KEY}", "4"), "limit 4"),
    (_set(f"{WORKER}/rayStartParams/num-gpus", "4"), "num-gpus 4"),
    (_set("/spec/rayClusterSpec/headGroupSpec/rayStartParams/num-gpus", "1"), "CPU-only"),
    (_set("/spec/submissionMode", "K8sJobMode"), "submissionMode"),
    (_set("/spec/submissionMode", "HttpMode"), "submissionMode"),
    (_set("/spec/shutdownAfterJobFinishes", False), "ttlSecondsAfterFinished"),
    (_set(f"{WORKER}/replicas", 2), "minReplicas <= replicas <= maxReplicas"),
    (_set(f"{POD}/containers/0/volumeMounts/0/mountPath", "/shm"), "/dev/shm"),
    (_set(f"{POD}/volumes/0/emptyDir", {}), "/dev/shm"),
    (_set(f"{POD}/containers/0/image", "mor-dist:0.1.0-ray2.9.0"), "installed Ray"),
    (_set("/spec/rayClusterSpec/rayVersion", "2.9.0"), "installed Ray"),
    (_set("/spec/entrypoint", "python train.py --config configs/tiny_mor.yaml"), "entrypoint"),
    (_set("/spec/entrypoint", "python jobs/pretrain.py --config configs/tiny_mor.yaml"), "run.storage_path"),
    (_set(f"{POD}/containers/0/env/0/value", "http://nowhere:5000"), "MLFLOW_TRACKING_URI"),
    (_set(f"{POD}/containers/0/env", []), "CUDA_DEVICE_MAX_CONNECTIONS"),
    (_set("/spec/workerGroupSpecs/0/rayStartParams/num-gpus", "8 ", "RayCluster"), "differs from"),
    (_set(f"{POD}/securityContext/runAsUser", 0), "runs as root"),
    (_set(f"{POD}/containers/0/securityContext", {"allowPrivilegeEscalation": True}), "allowPrivilegeEscalation"),
    (_set(f"{POD}/containers/0/env/-", {"name": "HF_TOKEN", "value": "hf_abc"}), "HF_TOKEN in plain text"),
    (_set(f"{POD}/containers/0/env/0/value", "http://me:pw@mor-mlflow:5000"), "in plain text"),
    (_set("/spec/rayClusterSpec/authOptions", {"mode": "disabled"}), "token authentication"),
    (_set("/spec/gcsFaultToleranceOptions/redisPassword", {"value": "x"}, "RayCluster"), "Redis password"),
    (_set("/spec/entrypoint", "python jobs/pretrain.py --config configs/mor_360m_nr3.yaml "
                              "run.storage_path=/mnt/checkpoints"), "run.max_failures"),
])
def test_project_rules_catch_mistakes(mutate: Callable[[list[Doc]], None], expected: str) -> None:
    docs = rendered("base")
    mutate(docs)
    assert any(expected in p for p in problems(docs)), problems(docs)


def config_problem(entrypoint: str, root: Path) -> str | None:
    """Why an entrypoint's --config is not a file under root/configs, if it is not."""
    config, _ = k8s.pretrain_args(entrypoint)
    return None if config.startswith("configs/") and (root / config).is_file() else f"{config} is not in {root / 'configs'}"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_config_exists_and_fits_the_cluster(target: str) -> None:
    job = one(rendered(target), "RayJob")
    if not any(CONFIGS.glob("*.yaml")):
        pytest.skip("configs/ holds no presets yet")
    assert config_problem(job["spec"]["entrypoint"], REPO) is None
    config, overrides = k8s.pretrain_args(job["spec"]["entrypoint"])
    cfg = load_config(REPO / config, overrides)
    spec = job["spec"]["rayClusterSpec"]
    gpus = k8s.cluster_gpus(spec)
    if gpus and target.startswith("overlays/"):
        assert cfg.world_size == gpus, f"{target}: tp*pp*dp = {cfg.world_size} but the cluster has {gpus} GPUs"
    elif gpus:
        assert cfg.world_size <= gpus
    else:
        cpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                   for g in spec["workerGroupSpecs"])
        assert cfg.parallel.use_gpu == "false" and cfg.world_size < cpus


def test_missing_config_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_mor.yaml").write_text("{}\n")
    assert config_problem("python jobs/pretrain.py --config configs/tiny_mor.yaml", tmp_path) is None
    assert "configs/nope.yaml" in config_problem("python jobs/pretrain.py --config configs/nope.yaml", tmp_path)


def test_gpu_overlays_share_checkpoints_read_write_many() -> None:
    for target in TARGETS:
        docs = rendered(target)
        claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "mor-checkpoints")
        if k8s.cluster_gpus(one(docs, "RayJob")["spec"]["rayClusterSpec"]):
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], target


def test_multi_node_jobs_wait_for_their_whole_gang_in_kueue() -> None:
    job = one(rendered("overlays/multi-node-4x8gpu"), "RayJob")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "mor-dist-gpu"


def test_dockerfile_matches_manifests() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER 1000$", text, re.M)  # the uid the manifests run as
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    assert ".".join(ray_version.split(".")[:2]) == RAY_MINOR
    assert '-e ".[${extra}]"' in text and "ray[default,train]==${RAY_VERSION}" in text
    extras = re.findall(r"^(gpu[\w-]*) = ", (REPO / "pyproject.toml").read_text(), re.M)
    assert sorted(re.findall(r"echo (gpu[\w-]*)", text)) == sorted(extras) == ["gpu", "gpu-cu13"]
    from mor_dist.tracking.metadata import GIT_COMMIT_ENV  # the image has no .git: it records its commit

    assert f"ENV {GIT_COMMIT_ENV}=${{GIT_COMMIT}}" in text and "ARG GIT_COMMIT" in text
    for target in TARGETS:
        for at, spec in cluster_specs(rendered(target)):
            assert spec["rayVersion"] == ray_version, at
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                container = group["template"]["spec"]["containers"][0]
                assert container["image"].endswith(f"-ray{ray_version}") and container["workingDir"] == workdir, at


def test_the_shared_mlflow_server_has_a_login_the_ray_pods_credentials_pass(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """overlays/mlflow-postgres's server command, run here with a local store and folder in place of PostgreSQL and
    S3: anonymous writes get 401, and the MLflow client gets in with MLFLOW_TRACKING_USERNAME/_PASSWORD, the names
    every Ray container reads from Secret mor-mlflow-auth."""
    import sys
    import urllib.error
    import urllib.request

    from mlflow import MlflowClient

    docs = rendered("overlays/mlflow-postgres")
    server = one([d for d in docs if d["metadata"]["name"] == "mor-mlflow"], "Deployment")["spec"]["template"]["spec"]
    command = server["containers"][0]["command"]
    login_env = {e["name"] for e in server["containers"][0]["env"]}
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= login_env
    for _, spec in cluster_specs(docs):
        for container in spec["headGroupSpec"]["template"]["spec"]["containers"]:
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
            assert refs["MLFLOW_TRACKING_USERNAME"] == refs["MLFLOW_TRACKING_PASSWORD"] == "mor-mlflow-auth"
    options = command[2:command.index("--host")]  # after `mlflow server`: stores and the app
    options[options.index("--backend-store-uri") + 1] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options[options.index("--artifacts-destination") + 1] = str(tmp_path / "artifacts")
    (tmp_path / "basic_auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'users.db'}\nadmin_username = x\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME":
           "trainer", "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-test-password", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from mlflow_screenshots import free_port, mlflow_server  # the local server the tracking tests use
    finally:
        sys.path.remove(str(REPO / "scripts"))
    with mlflow_server(free_port(), tmp_path, options, env) as url:
        anonymous = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/create", method="POST",
                                           data=b'{"name": "x"}', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=30)
        assert refused.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-long-test-password")
        client = MlflowClient(url)
        assert client.get_experiment(client.create_experiment("mor-dist")).name == "mor-dist"
