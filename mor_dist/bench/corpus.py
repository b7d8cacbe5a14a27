"""The shipped corpus as packed token rows in one .npz per length, for GPU hosts without `datasets`.

`python -m mor_dist.bench.corpus --seq 128 2048` (on a machine with the project's dependencies)
writes gpu_wheels/corpus/shipped_seq{L}.npz; scripts/gpu_wheels.sh carries that folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

from mor_dist.cmdline import positive_int
from mor_dist.config import REPO_ROOT, load_config


def corpus_dir() -> Path:
    """MOR_CORPUS_DIR, else gpu_wheels/corpus in the checkout."""
    return Path(os.environ.get("MOR_CORPUS_DIR", REPO_ROOT / "gpu_wheels" / "corpus"))


def corpus_path(seq_length: int) -> Path:
    return corpus_dir() / f"shipped_seq{seq_length}.npz"


def export(seq_length: int, out: Path) -> Path:
    """Tokenize and pack the shipped corpus's training split (needs `datasets`): rows [n, L + 1], padded vocabulary."""
    from mor_dist.data import padded_vocab_size, prepare_data

    cfg = load_config(None, [f"model.seq_length={seq_length}", "train.micro_batch_size=1",
                             "train.global_batch_size=1"])
    with tempfile.TemporaryDirectory() as cache:
        prepared = prepare_data(cfg, cache)
        rows = np.asarray(prepared.sequences("train"))
        vocab = padded_vocab_size(prepared.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"shipped_seq{seq_length}.npz"
    np.savez(path, rows=rows, vocab_size=np.int64(vocab))
    return path


def load(seq_length: int) -> tuple[np.ndarray, int]:
    """Rows and padded vocabulary at this length: the exported file, else prepared here (needs `datasets`)."""
    path = corpus_path(seq_length)
    if not path.exists():
        if importlib.util.find_spec("datasets") is None:
            raise FileNotFoundError(f"{path} is missing and `datasets` is not installed here; run `python -m "
                                    f"mor_dist.bench.corpus --seq {seq_length}` where it is and carry gpu_wheels/corpus")
        with tempfile.TemporaryDirectory() as tmp:
            path = export(seq_length, Path(tmp))
            with np.load(path) as f:
                return f["rows"], int(f["vocab_size"])
    with np.load(path) as f:
        return f["rows"], int(f["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mor_dist.bench.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=positive_int, nargs="+", default=[128, 2048], help="sequence lengths to pack for")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: MOR_CORPUS_DIR or gpu_wheels/corpus)")
    args = p.parse_args(argv)
    for seq in args.seq:
        path = export(seq, args.out or corpus_dir())
        with np.load(path) as f:
            print(f"{path}: {f['rows'].shape[0]} rows of {seq} + 1 tokens, vocabulary {int(f['vocab_size'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
