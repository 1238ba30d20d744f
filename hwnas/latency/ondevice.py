"""Timing whole subnets on the device a table was measured on, the way the profiler timed its calibration.

Drift checks and the measured final pick of a search compare such timings with the table's
numbers, which means something only on the table's own device and profile: both are refused
elsewhere, by fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hwnas.errors import LatencyTableError
from hwnas.latency.profiler import measure_subnets
from hwnas.latency.table import LatencyTable
from hwnas.space import Arch

# The quiet mode of a shared VM showed in one round in four at worst (see hwnas.latency.artifact.measure_artifact).
DEFAULT_ROUNDS = 8


def own_profile(table: LatencyTable, profile: Any = None) -> Any:
    """The table's profile (or `profile`), once this machine is checked to be the table's device."""
    from hwnas.latency.device import fingerprint

    profile = profile if profile is not None else table.profile
    if profile is None:
        raise LatencyTableError(f"{table.path}: the table records no profile, so there is nothing to time with")
    table.check_target(table.space, profile, fingerprint(profile))
    return profile


def subnet_timer(table: LatencyTable, profile: Any = None, *, rounds: int = DEFAULT_ROUNDS,
                 backend: Any = None) -> Callable[[Sequence[Arch]], list[float]]:
    """A function timing subnets end to end here, in the table's statistic (ms), each the quietest of
    `rounds` interleaved rounds (so a burst of load lands on one round of several subnets)."""
    from hwnas.latency.backends import get_backend

    profile = own_profile(table, profile)
    backend = backend if backend is not None else get_backend(profile)
    space, statistic = table.space, table.statistic

    def measure(archs: Sequence[Arch]) -> list[float]:
        timed = measure_subnets(space, list(archs), backend, rounds=rounds, statistic=statistic)
        return [float(timing.value(statistic)) for _, timing in timed]

    return measure
