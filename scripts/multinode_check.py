"""Multi-node Ray on one machine: `python scripts/multinode_check.py [--layouts dp2 tp2pp2] [--out DIR]
[--object-store]`.

For each layout it starts a real two-node Ray cluster here (`ray start --head` and a second
`ray start --address ...` node, each with half of the job's CPUs, so Ray Train must place workers on
both), then submits `jobs/pretrain.py` with `ray job submit` twice: uninterrupted, and again with the
second node lost after step 6 was logged (checkpoints every 4 steps): its raylet and the worker
processes it started are SIGKILLed at once, as a machine loss would. The node is started again a few
seconds later and Ray Train restarts the workers from the newest whole checkpoint. It checks that
workers ran on both nodes, that the killed run said which checkpoint step it restarted from and
continued at the step after it, and that every step's loss equals the uninterrupted run's. Exits 1
on any failure. About 8 minutes on 2 cores; stops every Ray process on this machine (`ray stop`)
before and after, so run it alone.

With --object-store the runs live in a bucket of a local S3-compatible server (moto, started here)
instead of a shared directory, as on a cluster without a shared volume: checkpoints, the run's files
and the prepared data travel through the bucket. The run's files reach the bucket at checkpoints, so
the node is lost after the first checkpoint past step 6, and the runs are longer to leave room for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlflow_screenshots import free_port
from recovery_demo import interesting, losses, steps_logged

from mor_dist.location import Location, locate

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"dp2": ["parallel.dp=2"], "tp2pp2": ["parallel.tp=2", "parallel.pp=2"]}
CHECKPOINT_INTERVAL = 4
COMMON = ["train.micro_batch_size=4", "train.steps=12", f"train.checkpoint_interval={CHECKPOINT_INTERVAL}", "train.log_interval=1", "train.eval_interval=-1",
          "train.decay_fraction=0", "run.max_failures=3"]
KILL_AFTER_STEP = 6
OBJECT_STORE_STEPS = ["train.steps=20"]  # the kill waits for a checkpoint's upload: leave steps after it
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
RESTART_AFTER_S = 5.0
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONWARNINGS": "ignore",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's `python`


def ray(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The `ray` CLI of this environment."""
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], capture_output=True, text=True,
                          env=ENV, timeout=300)
    if check and done.returncode != 0:
        raise SystemExit(f"ray {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


class Cluster:
    """A head node and a second node on this machine, each with `cpus` CPUs."""

    def __init__(self, cpus: int) -> None:
        self.cpus, self.gcs, self.dashboard = cpus, free_port(), free_port()
        self.temp_dirs: list[str] = []
        ray("stop", "--force", check=False)
        # Each node its own temp dir: nodes of one machine otherwise share one runtime-env folder, and one node's
        # agent deletes the job's working_dir files while the other's job imports them.
        ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}", f"--num-cpus={cpus}",
            f"--temp-dir={self.temp_dir('head')}",
            "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard}", "--disable-usage-stats")
        self.second_port = self.start_second()

    def temp_dir(self, role: str) -> str:
        """A fresh temp dir for one node's Ray session (Ray's logs: kept when a check fails)."""
        self.temp_dirs.append(tempfile.mkdtemp(prefix=f"ray-{role}-"))
        return self.temp_dirs[-1]

    def start_second(self) -> int:
        """Start (or restart) the second node; returns its raylet's port (how its process is found)."""
        port = free_port()
        ray("start", f"--address=127.0.0.1:{self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
            f"--temp-dir={self.temp_dir('second')}",
            "--num-gpus=0", f"--node-manager-port={port}", "--disable-usage-stats")
        self.wait_for_nodes(2)
        return port

    def alive_nodes(self) -> list[dict]:
        listed = ray("list", "nodes", f"--address=127.0.0.1:{self.gcs}", "--format=json", "--filter", "state=ALIVE",
                     check=False)
        return json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.lstrip().startswith("[") else []

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while len(self.alive_nodes()) < count:
            if time.time() > deadline:
                raise SystemExit(f"the cluster did not reach {count} alive nodes in {timeout:.0f} s")
            time.sleep(1)

    def worker_nodes(self) -> set[str]:
        """Node ids of the alive Ray Train workers."""
        listed = ray("list", "actors", f"--address=127.0.0.1:{self.gcs}", "--format=json", "--filter",
                     "class_name=RayTrainWorker", "--filter", "state=ALIVE", "--limit=100", check=False)
        if listed.returncode != 0 or not listed.stdout.lstrip().startswith("["):  # e.g. "No resource in the cluster"
            return set()
        return {actor["node_id"] for actor in json.loads(listed.stdout)}

    def kill_second_node(self) -> int:
        """SIGKILL the second node's raylet and every process it started (its workers), at once, as a machine loss
        would (workers outliving their raylet run on for seconds); returns the raylet's pid."""
        found = subprocess.run(["pgrep", "-f", f"raylet.*node_manager_port={self.second_port}"], capture_output=True,
                               text=True).stdout.split()
        if len(found) != 1:
            raise SystemExit(f"expected one raylet on port {self.second_port}, found {found}")
        raylet = int(found[0])
        tree, pending = [raylet], [raylet]
        while pending:
            children = subprocess.run(["pgrep", "-P", str(pending.pop())], capture_output=True, text=True).stdout
            tree += [int(pid) for pid in children.split()]
            pending += [int(pid) for pid in children.split()]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return raylet

    def submit(self, name: str, storage: Path | Location, overrides: list[str]) -> subprocess.Popen:
        """`ray job submit` of jobs/pretrain.py (follows the job's logs until it ends)."""
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit",
               f"--address=http://127.0.0.1:{self.dashboard}", f"--working-dir={ROOT}", "--",
               "python", "jobs/pretrain.py", *COMMON, *overrides, f"run.name={name}", f"run.storage_path={storage}"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)

    def stop(self) -> None:
        ray("stop", "--force", check=False)

    def remove_logs(self) -> None:
        for directory in self.temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def watch_and_kill(cluster: Cluster, run_dir: Path | Location, notes: dict) -> None:
    """When step KILL_AFTER_STEP is logged: note the workers' nodes, lose the second node, start it again."""
    while steps_logged(run_dir) < KILL_AFTER_STEP:
        notes["nodes_seen"] = max(notes.get("nodes_seen", 0), len(cluster.worker_nodes()))
        time.sleep(0.5)
    notes["pid"], notes["killed_at"] = cluster.kill_second_node(), time.time()
    notes["killed_after_step"] = steps_logged(run_dir)
    time.sleep(RESTART_AFTER_S)
    cluster.second_port = cluster.start_second()
    notes["node_back_after_s"] = time.time() - notes["killed_at"]


def run_layout(layout: str, out: Path | Location, extra: list[str]) -> list[str]:
    """Reference and killed runs of one layout on a fresh two-node cluster; the problems found."""
    overrides = LAYOUTS[layout] + extra
    world = 4 if layout == "tp2pp2" else 2
    cluster = Cluster(world // 2)
    problems: list[str] = []
    try:
        reference = cluster.submit(f"{layout}-uninterrupted", out, overrides)
        console, _ = reference.communicate(timeout=900)
        if reference.returncode != 0:
            return [f"{layout}: the uninterrupted job failed:\n{console[-4000:]}\nRay's logs: {cluster.temp_dirs}"]
        name, notes = f"{layout}-killed", {}
        killed = cluster.submit(name, out, overrides)
        watcher = threading.Thread(target=watch_and_kill, args=(cluster, out / name, notes), daemon=True)
        watcher.start()
        console, _ = killed.communicate(timeout=900)
        watcher.join(timeout=120)
    finally:
        cluster.stop()
    expected, got = losses(out / f"{layout}-uninterrupted"), losses(out / name)
    diff = max(abs(got.get(s, float("inf")) - expected[s]) for s in expected)
    print(f"## {layout}: {world} workers, {world // 2} CPUs on each of two nodes\n")
    print(f"workers seen on {notes.get('nodes_seen', 0)} node(s); the second node (raylet {notes.get('pid')} and its "
          f"workers) killed after step {notes.get('killed_after_step')} was logged; the node was back "
          f"{notes.get('node_back_after_s', float('nan')):.0f} s later\n\n```")
    print("\n".join(line for line in interesting(console) if not re.search(r"\bINFO\b", line)))  # not Ray's notes
    print(f"```\n\nloss at steps 1-{max(expected)}: {sum(got.get(s) == expected[s] for s in expected)} of "
          f"{len(expected)} bit-identical to the uninterrupted run (max |diff| {diff:.1e})\n", flush=True)
    if killed.returncode != 0:
        problems.append(f"{layout}: the killed job failed (exit {killed.returncode}):\n{console[-4000:]}")
    if notes.get("nodes_seen", 0) < 2:
        problems.append(f"{layout}: the workers did not run on both nodes")
    restart = re.search(r" lost: .*; restarting the workers from step (\d+)", console)
    resumed = re.search(r"step (\d+)/", console[restart.end():]) if restart else None
    if not restart or int(restart.group(1)) % CHECKPOINT_INTERVAL or not resumed or \
            int(resumed.group(1)) != int(restart.group(1)) + 1:
        problems.append(f"{layout}: no restart from a checkpoint, continuing at the step after it, was reported")
    if diff > 1e-4 * max(abs(v) for v in expected.values()):
        problems.append(f"{layout}: losses differ from the uninterrupted run (max |diff| {diff:.1e})")
    if problems:
        problems.append(f"{layout}: Ray's logs are kept in {cluster.temp_dirs}")
    else:
        cluster.remove_logs()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["dp2", "tp2pp2"])
    parser.add_argument("--out", type=Path, default=None, help="run storage (default: a new temporary directory)")
    parser.add_argument("--object-store", action="store_true",
                        help="keep the runs in a bucket of a local S3-compatible server (moto) instead of --out")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="multinode-"))).resolve()
    store = " --object-store" if args.object_store else ""
    print(f"# command: python scripts/multinode_check.py --layouts {' '.join(args.layouts)} --out {out}{store}\n")
    server = None
    storage: Path | Location = out
    extra: list[str] = []
    if args.object_store:
        server, storage = start_bucket()
        extra = OBJECT_STORE_STEPS + [f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]  # sqlite cannot live in a bucket
        print(f"runs in {storage}\n")
    try:
        problems = [p for layout in args.layouts for p in run_layout(layout, storage, extra)]
    finally:
        if server is not None:
            server.terminate()
    print("\n".join(problems) if problems else "every layout recovered with the uninterrupted run's losses")
    return 1 if problems else 0


def start_bucket() -> tuple[subprocess.Popen, Location]:
    """A local S3-compatible server (moto) with one bucket; its credentials reach every Ray node through ENV."""
    import pyarrow.fs as pafs

    ENV.update(S3_CREDENTIALS)
    os.environ.update(S3_CREDENTIALS)
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 60
    while True:
        try:
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                              allow_bucket_creation=True).create_dir("multinode")
            break
        except OSError:
            if time.time() > deadline:
                server.terminate()
                raise SystemExit(f"the local S3 server on port {port} did not start")
            time.sleep(0.5)
    return server, locate(f"s3://multinode/runs?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1")


if __name__ == "__main__":
    sys.exit(main())
