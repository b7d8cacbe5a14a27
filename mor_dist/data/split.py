"""Held-out validation documents, chosen deterministically from the seed: by position, or by the hash of the text."""

from __future__ import annotations

import hashlib

import numpy as np
from datasets import Dataset


def split_documents(document_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document ids: a seeded `fraction` (at least one each way), both sorted."""
    if len(document_ids) < 2:
        raise ValueError(f"need at least 2 documents to hold some out, got {len(document_ids)}")
    shuffled = np.random.default_rng(seed).permutation(document_ids)
    num_validation = min(max(1, round(fraction * len(document_ids))), len(document_ids) - 1)
    return np.sort(shuffled[num_validation:]), np.sort(shuffled[:num_validation])


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """For streams and mixtures: a document is held out when the seeded hash of its text falls below `fraction`. By
    content, not position, so the rule holds whatever shard, node, shuffled order or repetition it arrives in."""
    digest = hashlib.blake2b(f"{seed}:".encode() + text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def held_out_by_text(dataset: Dataset, column: str, fraction: float, seed: int) -> np.ndarray:
    """`is_validation` of every document of a dataset, in its order (copies of a document share their side)."""
    flags = (is_validation(text or "", fraction, seed)
             for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=1024)
             for text in table[column].to_pylist())
    return np.fromiter(flags, dtype=bool, count=len(dataset))
