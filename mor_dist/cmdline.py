"""What every command line shares: argparse value types that refuse impossible numbers (naming the flag) or
bring a checkpoint out of an object store, and the entry-point wrapper (argv from the process, library
warnings silenced, a ConfigError shown as one `error:` line with exit status 2). The benchmarks' and the
jobs' command lines use it."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

from mor_dist.errors import ConfigError
from mor_dist.location import is_uri


def _bounded(kind: type, lowest: float, inclusive: bool, what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lowest or (value == lowest and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _bounded(int, 1, True, "a positive integer")
non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0.0, False, "a number > 0")
non_negative_float = _bounded(float, 0.0, True, "a number >= 0")


def checkpoint_path(text: str) -> Path:
    """A local path as given; a URI (s3://bucket/runs/<name>[/checkpoint_...]) names a checkpoint in an object
    store, downloaded once into the local cache (a run directory gives its newest whole checkpoint)."""
    if not is_uri(text):
        return Path(text)
    from mor_dist.catalog import resolve_checkpoint

    try:
        return resolve_checkpoint(text, warn=lambda line: print(line, file=sys.stderr))
    except (ConfigError, OSError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def command(main: Callable[[list[str]], int]) -> Callable[[Optional[list[str]]], int]:
    """Wrap `main(argv) -> exit status` as an entry point."""

    @functools.wraps(main)
    def run(argv: Optional[list[str]] = None) -> int:
        warnings.filterwarnings("ignore", category=UserWarning)  # megatron's notes on absent TE/Apex at import
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run
