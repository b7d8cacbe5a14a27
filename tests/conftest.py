"""Shared fixtures: one single-process gloo world per session; megatron state reset per use."""

from __future__ import annotations

import warnings

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.parallel.setup import init_model_parallel, init_single_process

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


@pytest.fixture(scope="session")
def world():
    """torch.distributed with world size 1 (gloo on loopback)."""
    init_single_process()
    yield


@pytest.fixture
def build(world):
    """Build a model from the tiny config plus overrides: build(*overrides, vocab=256)."""
    from mor_dist.model.mor import build_model

    def _build(*overrides: str, vocab: int = 256):
        cfg = load_config(None, list(overrides))
        init_model_parallel(cfg.parallel, cfg.train.seed)
        return build_model(cfg, vocab, on_cuda=False), cfg

    return _build


def gpu_available() -> bool:
    return torch.cuda.is_available()
