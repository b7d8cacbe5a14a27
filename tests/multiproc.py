"""Run the training loop in a local gloo world of N processes (no Ray): the layout-equality harness."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from one server process that imported torch, megatron and the loop once (about 8 s of CPU per
# rank otherwise); the server starts on first use and lives as long as the test process.
mp.get_context("forkserver").set_forkserver_preload(["mor_dist.train.loop"])


def _fresh_store(out_dir: Path) -> str:
    """A new rendezvous file (a stale one from an earlier run would hang the next rendezvous)."""
    store = out_dir / "store"
    store.unlink(missing_ok=True)
    return str(store)


def _init(rank: int, world: int, store: str) -> None:
    """A file rendezvous: no ports to collide with other processes on the machine."""
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _worker(rank: int, world: int, store: str, overrides: list[str], data_dir: str, vocab: int, out: str,
            resume: str | None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    _init(rank, world, store)
    from mor_dist.config import load_config
    from mor_dist.train.loop import Hooks, train

    cfg = load_config(None, overrides)
    reports: list[dict] = []
    run_dir = Path(out).parent / "run"
    hooks = Hooks(rank, lambda metrics, directory: reports.append({**metrics, "checkpoint": str(directory)}),
                  lambda step: run_dir / f"checkpoint_{step:06d}", Path(resume) if resume else None)
    train(cfg, Path(data_dir), vocab, run_dir, False, hooks)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    dist.destroy_process_group()


def _call(rank: int, world: int, store: str, fn, args: tuple, out: str) -> None:
    _init(rank, world, store)
    Path(f"{out}.{rank}").write_text(json.dumps(fn(*args)))
    dist.destroy_process_group()


def run_ranks(world: int, fn, args: tuple, out_dir: Path) -> list:
    """fn(*args) on every rank of a gloo world (fn at module level, JSON-able result); results by rank."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = str(out_dir / "result")
    mp.start_processes(_call, args=(world, _fresh_store(out_dir), fn, args, out), nprocs=world, join=True,
                       start_method="forkserver")
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]


def run_world(world: int, overrides: list[str], data_dir: Path, vocab: int, out_dir: Path,
              resume: Path | None = None) -> list[dict]:
    """Train in `world` processes (checkpoints in out_dir/run); returns rank 0's reports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "reports.json"
    mp.start_processes(_worker, args=(world, _fresh_store(out_dir), overrides, str(data_dir), vocab, str(out),
                                          str(resume) if resume else None),
                       nprocs=world, join=True, start_method="forkserver")
    return json.loads(out.read_text())
