"""Timing whole subnets on the device a table was measured on, the way the profiler timed its calibration.

Drift checks and the measured final pick of a search compare such timings with the table's
numbers, which means something only on the table's own device and profile: both are refused
elsewhere, by fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hwnas.errors import LatencyTableError
from hwnas.latency.profiler import MAX_ROUNDS, measure_subnets
from hwnas.latency.quiet import QuietGuard
from hwnas.latency.table import LatencyTable
from hwnas.space import Arch

# At least three rounds, up to MAX_ROUNDS until the quickest two agree: the profiler's schedule, so that
# a timing here and the table's number mean the same (benchmarks/timing_schedule.py).
DEFAULT_ROUNDS = 3


def own_profile(table: LatencyTable, profile: Any = None) -> Any:
    """The table's profile (or `profile`), once this machine is checked to be the table's device."""
    from hwnas.latency.device import fingerprint

    profile = profile if profile is not None else table.profile
    if profile is None:
        raise LatencyTableError(f"{table.path}: the table records no profile, so there is nothing to time with")
    table.check_target(table.space, profile, fingerprint(profile))
    return profile


def subnet_timer(table: LatencyTable, profile: Any = None, *, rounds: int = DEFAULT_ROUNDS,
                 backend: Any = None, guard: QuietGuard | None = None,
                 max_rounds: int = MAX_ROUNDS) -> Callable[[Sequence[Arch]], list[float]]:
    """A function timing subnets end to end here, in the table's statistic (ms), each the quickest of at least
    `rounds` interleaved rounds, more until two agree (the profiler's schedule, `time_interleaved`), with
    `guard` watching the machine."""
    from hwnas.latency.backends import get_backend

    profile = own_profile(table, profile)
    backend = backend if backend is not None else get_backend(profile)
    space, statistic = table.space, table.statistic

    def measure(archs: Sequence[Arch]) -> list[float]:
        timed = measure_subnets(space, list(archs), backend, rounds=rounds, statistic=statistic, guard=guard,
                                max_rounds=max_rounds)
        return [float(timing.value(statistic)) for _, timing in timed]

    return measure
