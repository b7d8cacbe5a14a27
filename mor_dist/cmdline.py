"""What every command line shares: argparse value types that refuse impossible numbers (naming the flag),
and the entry-point wrapper (argv from the process, library warnings silenced, a ConfigError shown as
one `error:` line with exit status 2). A leaf: the benchmarks' and the jobs' command lines use it."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from typing import Callable, Optional

from mor_dist.errors import ConfigError


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
