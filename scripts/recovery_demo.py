"""Recovery demo: `kill -9` a Ray worker during training and during a checkpoint write, then compare the
losses with an uninterrupted run. `python scripts/recovery_demo.py [--out DIR]` (about 4 minutes on 2 cores).

Each launch is `jobs/pretrain.py` on the tiny default with tensor parallel 2; a watcher thread sends SIGKILL
to one `ray::RayTrainWorker` process when the run reaches the moment, so Ray Train restarts the workers
from the newest whole checkpoint (run.max_failures=2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["parallel.tp=2", "train.steps=24", "train.log_interval=1", "train.checkpoint_interval=4",
          "train.eval_interval=-1", "run.max_failures=2"]


def worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes on this machine."""
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def steps_logged(run_dir: Path) -> int:
    """The last step in the run's metrics.jsonl (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines), default=0)


def checkpoint_being_written(step: int) -> Callable[[Path], bool]:
    """True once a worker has started writing its local part of step `step`'s checkpoint."""
    def started(run_dir: Path) -> bool:
        launch = run_dir / "launch"
        if not launch.exists():
            return False
        return any(Path(tempfile.gettempdir()).glob(f"mor-ckpt-{launch.read_text().strip()}-{step}-*"))
    return started


def kill_when(run_dir: Path, moment: Callable[[Path], bool], log: list[str]) -> None:
    """Watch the run; at the moment, SIGKILL the last Ray Train worker and note it."""
    while not moment(run_dir):
        time.sleep(0.02)
    victim = max(worker_pids())
    os.kill(victim, signal.SIGKILL)
    log.append(f"kill -9 {victim} (a ray::RayTrainWorker) after step {steps_logged(run_dir)} was logged")


def pretrain(out: Path, name: str, moment: Callable[[Path], bool] | None = None) -> tuple[str, list[str]]:
    """One launch; returns its console output (without Ray's per-process noise) and the kill note."""
    cmd = [sys.executable, "jobs/pretrain.py", *COMMON, f"run.name={name}", f"run.storage_path={out}"]
    notes: list[str] = []
    watcher = threading.Thread(target=kill_when, args=(out / name, moment, notes), daemon=True) if moment else None
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if watcher:
        watcher.start()
    console, _ = process.communicate(timeout=900)
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{console[-4000:]}")
    return console, notes


def losses(run_dir: Path) -> dict[int, float]:
    """loss/train_lm by step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/train_lm"] for r in records if "loss/train_lm" in r}


def interesting(console: str) -> list[str]:
    """The lines a user reads: our messages and the progress bar, not Ray's or megatron's chatter."""
    keys = ("lost:", "restarting", "resuming", "skipping", "step ", "Done.")
    return [line.split("[0m ", 1)[-1] for line in console.splitlines() if any(k in line for k in keys)
            and "Megatron" not in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="recovery-demo-")))
    out = parser.parse_args().out.resolve()
    reference, _ = pretrain(out, "uninterrupted")
    cases = {"kill -9 during training (after step 10)": ("killed_training", lambda d: steps_logged(d) >= 10),
             "kill -9 while step 12's checkpoint is written": ("killed_checkpoint", checkpoint_being_written(12))}
    expected = losses(out / "uninterrupted")
    print(f"# command: python scripts/recovery_demo.py --out {out}\n")
    for title, (name, moment) in cases.items():
        console, notes = pretrain(out, name, moment)
        got = losses(out / name)
        same = sum(got[s] == expected[s] for s in expected)
        print(f"## {title}\n\n{notes[0] if notes else 'no kill happened'}\n\n```")
        print("\n".join(interesting(console)))
        print(f"```\n\nlm_loss at steps 1-{max(expected)}: {same} of {len(expected)} bit-identical to the "
              f"uninterrupted run (max |diff| {max(abs(got[s] - expected[s]) for s in expected):.1e})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
