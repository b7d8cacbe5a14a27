"""Run the training loop in a local gloo world of N processes (no Ray): the layout-equality harness."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], data_dir: str, vocab: int, out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mor_dist.config import load_config
    from mor_dist.train.loop import Hooks, train

    cfg = load_config(None, overrides)
    reports: list[dict] = []
    hooks = Hooks(rank, lambda metrics, directory: reports.append({**metrics, "checkpoint": str(directory)}))
    train(cfg, Path(data_dir), vocab, Path(out).parent / "run", False, hooks)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))
    dist.destroy_process_group()


def run_world(world: int, overrides: list[str], data_dir: Path, vocab: int, out_dir: Path) -> list[dict]:
    """Train in `world` processes; returns the metrics rank 0 reported at each report point."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "reports.json"
    mp.start_processes(_worker, args=(world, _free_port(), overrides, str(data_dir), vocab, str(out)),
                       nprocs=world, join=True, start_method="spawn")
    return json.loads(out.read_text())
