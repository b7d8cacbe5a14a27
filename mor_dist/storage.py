"""run.storage_path checked before anything expensive: writable, with room for checkpoints (a directory), or an
object store that accepts writes."""

from __future__ import annotations

import shutil
import tempfile
import uuid

from mor_dist.config import JobConfig
from mor_dist.errors import ConfigError
from mor_dist.location import Where, locate

GIB = 2**30


def check_writable(location: Where) -> None:
    """run.storage_path exists (or can be created) as a directory this process can write to; in an object store,
    a probe object can be written and deleted."""
    location = locate(location)
    if not location.is_local:
        probe = location / f".write-check-{uuid.uuid4().hex}"
        try:
            location.mkdir()  # creates the bucket too, where the URI allows it (allow_bucket_creation=true)
            probe.write_text("")
            probe.remove()
        except OSError as err:
            raise ConfigError(f"run.storage_path={location} is not writable ({err}); check the bucket, its "
                              "credentials (e.g. AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS) and the URI's "
                              "options (e.g. ?endpoint_override=host:port&scheme=http)") from err
        return
    storage = location.local
    where = f"run.storage_path={storage}"
    for parent in (storage, *storage.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{where}: {parent} is a file, not a directory; point run.storage_path at a directory")
        if parent.exists():
            break
    try:
        storage.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{where} is not writable ({err.strerror or err}); choose a directory you can write to, "
                          "e.g. run.storage_path=runs") from err


def checkpoint_bytes(cfg: JobConfig, parameters: int) -> int:
    """About how large one checkpoint is: weights plus Adam's two moments (plus fp32 master weights in bf16/fp8)."""
    per_parameter = 12 if cfg.train.precision == "fp32" else 14
    return parameters * per_parameter


def check_room(cfg: JobConfig, location: Where, parameters: int) -> str:
    """Refuse when one checkpoint cannot fit; else a line on the free space and what checkpoints need."""
    location = locate(location)
    one = checkpoint_bytes(cfg, parameters)
    if not location.is_local:
        return (f"storage {location}: an object store (no free space to check); a checkpoint takes about "
                f"{one / GIB:.2f} GiB ({cfg.run.keep_checkpoints} kept)")
    storage = location.local
    free = shutil.disk_usage(storage).free
    kept = one * (cfg.run.keep_checkpoints + 1)  # the kept ones plus the one being written
    line = (f"storage {storage}: {free / GIB:.1f} GiB free; a checkpoint takes about {one / GIB:.2f} GiB "
            f"({cfg.run.keep_checkpoints} kept)")
    if cfg.train.checkpoint_interval >= 0 and free < one:
        raise ConfigError(f"run.storage_path={storage} has {free / GIB:.2f} GiB free, but one checkpoint of this "
                          f"model takes about {one / GIB:.2f} GiB; free space there or choose another run.storage_path")
    if cfg.train.checkpoint_interval >= 0 and free < kept:
        line += f"; warning: {cfg.run.keep_checkpoints} kept checkpoints need about {kept / GIB:.2f} GiB"
    return line
