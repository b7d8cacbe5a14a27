"""Shared fixtures: one single-process gloo world per session; megatron state reset per use and torn down
after each module, with the process's thread count checked there."""

from __future__ import annotations

import gc
import logging
import os
import uuid
import warnings

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.parallel.setup import destroy_parallel_groups, init_single_process

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


THREAD_LIMIT = 200  # torch, gloo, MLflow and datasets threads of one module's fixtures fit well below


def thread_count() -> int:
    """Threads of this process (native ones included, which `threading` does not see)."""
    return len(os.listdir("/proc/self/task"))


@pytest.fixture(autouse=True, scope="module")
def release_model_parallel():
    """After each test module: destroy megatron's groups, then check nothing else left threads running."""
    yield
    destroy_parallel_groups()
    gc.collect()
    if os.path.isdir("/proc/self/task"):
        count = thread_count()
        assert count < THREAD_LIMIT, f"the test process holds {count} threads after this module; tear down what it made"


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
        return build_model(cfg, vocab, on_cuda=False), cfg

    return _build


def gpu_available() -> bool:
    return torch.cuda.is_available()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                  "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) for the session, its credentials in the environment (so that Ray's
    workers, started from here, read them as they would a real bucket's); yields its host:port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in S3_CREDENTIALS.items():
            env.setenv(key, value)
        yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_uri(s3_server):
    """A fresh bucket's URI on the local S3 server, with the options pyarrow (and Ray) need to reach it."""
    import pyarrow.fs as pafs

    bucket = f"mor-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}/runs?endpoint_override={s3_server}&scheme=http&region=us-east-1"
