"""Fail in seconds, not after minutes of retries, when a hub name is given and the hub cannot be reached."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from mor_dist.errors import ConfigError

PROBE_TIMEOUT_S = 5.0


def require_hub(key: str, name: str) -> None:
    """Refuse `key=name` (a hub name) when neither the hub nor the proxy before it answers; HF_HUB_OFFLINE=1
    skips the check and lets the local Hugging Face cache answer."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy or constants.ENDPOINT)
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"{key}={name!r} names a Hugging Face hub repo, but {host}:{port} cannot be reached "
                          f"({err}); use a local path, or set HF_HUB_OFFLINE=1 to use a copy already in the local "
                          "Hugging Face cache") from err
