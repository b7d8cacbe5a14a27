"""What a run prints: its phases, and Ray's and megatron's routine notices kept off the console.

Only messages known to be routine are dropped; anything else, and every real failure, still prints in full.
"""

from __future__ import annotations

import logging
import os
import time

# A line Ray's controller logs for its own preemption watcher on every run (Ray 2.60, `E ... core_worker.cc`): the
# actor's arguments sit in the object store and it may restart, which is how Ray Train creates it. Nothing failed.
RAY_ROUTINE_LINES = r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"
WORKER_SETUP_HOOK = "mor_dist.console.setup_worker_process"  # runtime_env worker_process_setup_hook
_started = time.monotonic()


def phase(text: str) -> None:
    """One line naming what the run does now, with the seconds since the command started."""
    print(f"[{time.monotonic() - _started:5.1f}s] {text}", flush=True)


def quiet_ray_driver(local: bool) -> None:
    """Before Ray is imported on the driver: drop Ray's routine lines from the workers' streamed logs, and for a
    local cluster choose token authentication explicitly (Ray's default, which it otherwise announces as a
    WARNING on every start)."""
    own = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{own}|{RAY_ROUTINE_LINES}" if own else RAY_ROUTINE_LINES
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


class DropCleanerStopTimeout(logging.Filter):
    """Ray Train logs a traceback when stopping its placement-group cleaner times out, which happens on a loaded
    machine after training has ended; the cleaner only removes placement groups of a dead controller, and the run
    is unaffected. Other records of that logger pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return type(error).__name__ != "GetTimeoutError"


_CLEANER_FILTER = DropCleanerStopTimeout()  # one instance: logging adds a filter once however often setup runs


def setup_worker_process() -> None:
    """Every Ray process of a run (workers and Ray Train's controller), before it imports megatron: megatron's
    import-time INFO notes and its rerun state machine's WARNING-level start note off; Ray Train's per-report INFO
    lines (logged under a file-path logger name that LoggingConfig does not reach) off; the cleaner timeout
    dropped."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("megatron.core.rerun_state_machine").setLevel(logging.ERROR)
    logging.getLogger("ray.train.v2._internal.callbacks.placement_group_callback").addFilter(_CLEANER_FILTER)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
