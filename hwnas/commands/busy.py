"""The quiet guard's options, shared by the commands that time on this machine (profile, latency validate | drift)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwnas.latency.quiet import QuietGuard


def add_busy_arguments(parser: argparse.ArgumentParser) -> None:
    """--allow-busy, --busy-threshold, --max-wait (the guard's defaults; see hwnas.latency.quiet)."""
    parser.add_argument("--allow-busy", action="store_true",
                        help="keep timings made while other CPUs were busy (marked as such, with a warning) instead "
                             "of refusing to write them")
    parser.add_argument("--busy-threshold", type=float, default=0.10, metavar="SHARE",
                        help="the other CPUs' busy share above which the machine counts as busy (default: %(default)s)")
    parser.add_argument("--max-wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for a quiet machine before each group of timings (default: "
                             "%(default)s)")


def guard_from_args(args: argparse.Namespace, command: str) -> QuietGuard:
    """The guard the options describe; its lines go to stderr, prefixed like the command's warnings."""
    from hwnas.latency.quiet import QuietGuard

    return QuietGuard(threshold=args.busy_threshold, max_wait_s=args.max_wait,
                      policy="warn" if args.allow_busy else "refuse",
                      log=lambda line: print(f"hwnas {command}: {line.strip()}", file=sys.stderr))
