"""Held-out validation documents, chosen deterministically from the seed."""

from __future__ import annotations

import hashlib

import numpy as np


def split_documents(document_ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document ids: a seeded `fraction` (at least one each way), both sorted."""
    if len(document_ids) < 2:
        raise ValueError(f"need at least 2 documents to hold some out, got {len(document_ids)}")
    shuffled = np.random.default_rng(seed).permutation(document_ids)
    num_validation = min(max(1, round(fraction * len(document_ids))), len(document_ids) - 1)
    return np.sort(shuffled[num_validation:]), np.sort(shuffled[:num_validation])


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """For streams: a document is held out when the seeded hash of its text falls below `fraction`. By content,
    not position, so the rule holds whatever shard, node or shuffled order a document arrives in."""
    digest = hashlib.blake2b(f"{seed}:".encode() + text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64
