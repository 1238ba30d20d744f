"""Does the device still run as fast as when its table was measured?

The fingerprint tells whether a machine is the same model, with the same clocks, driver and
libraries; it cannot tell whether it is as quiet. On the shared 2-vCPU development VM the committed
ONNX Runtime table's 30 calibration subnets ran a median 12 % slower (4 % to 41 %) a few hours
after profiling, on the same fingerprint, and a search aimed at the table's numbers then shipped
models over budget. Re-timing a few of the calibration subnets, the same way they were timed,
measures that factor in seconds; `LatencyTable.with_drift` then predicts for the device as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from hwnas.errors import LatencyTableError
from hwnas.latency.ondevice import DEFAULT_ROUNDS, subnet_timer
from hwnas.latency.profiler import calibration_path
from hwnas.latency.quiet import QuietGuard
from hwnas.latency.table import LatencyTable
from hwnas.space import Arch

DEFAULT_ANCHORS = 8
DEFAULT_TOLERANCE = 0.05  # the share of validation subnets within +-5 % is the table's figure of merit


@dataclass
class DriftCheck:
    """Anchor subnets timed now against their times in the table's calibration."""

    factor: float  # median of now / then: > 1 means the device is slower now
    arch_ids: list[str]
    then_ms: list[float]
    now_ms: list[float]
    seconds: float
    tolerance: float = DEFAULT_TOLERANCE
    passes: int = 1  # a second pass is timed when the first finds drift (see check_drift)
    profile: str | None = None  # the table's profile and space, for the advice
    space: str | None = None

    @property
    def advice(self) -> str:
        """What to do about a drift beyond the tolerance ('' within it)."""
        if not self.significant:
            return ""
        return (f"the table no longer describes this device as it runs now: profile it again (hwnas profile --profile "
                f"{self.profile or 'PROFILE'} --space {self.space or 'SPACE'} --no-resume) once the machine is quiet, "
                "or scale the predictions for one search (hwnas search --drift correct)")

    @property
    def ratios(self) -> list[float]:
        return [n / t for n, t in zip(self.now_ms, self.then_ms, strict=True)]

    @property
    def significant(self) -> bool:
        """True when the device runs more than `tolerance` faster or slower than the table says."""
        return abs(self.factor - 1.0) > self.tolerance

    def describe(self) -> str:
        r = self.ratios
        state = "slower" if self.factor > 1 else "faster"
        verdict = "beyond" if self.significant else "within"
        times = "" if self.passes == 1 else " twice (the quicker kept)"
        change = abs(self.factor - 1) * 100
        return (f"{len(r)} calibration subnets re-timed{times} in {self.seconds:.1f} s run {change:.1f} % {state}"
                f" than when the table was measured (median ratio {self.factor:.3f}, range "
                f"{min(r):.3f}-{max(r):.3f}; {verdict} the +-{self.tolerance * 100:.0f} % tolerance)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios, "significant": self.significant}


def anchor_archs(table: LatencyTable, n: int = DEFAULT_ANCHORS) -> list[tuple[Arch, float]]:
    """`n` calibration subnets spread over the table's latency range, with the time recorded for each.

    Spread, not random: a drift that only slows large (memory-bound) or small (overhead-bound)
    subnets should show in the median either way.
    """
    if n < 1:
        raise LatencyTableError(f"a drift check needs at least 1 anchor subnet, got {n}")
    if table.path is None:
        raise LatencyTableError("a drift check needs a table loaded from disk (its calibration subnets are beside it)")
    path = calibration_path(table.path)
    column = table.statistic_column
    try:
        rows = pd.read_csv(path)
    except FileNotFoundError:
        raise LatencyTableError(f"{path}: no calibration subnets to re-time (profile with calibration "
                                "subnets to check drift)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LatencyTableError(f"{path}: unreadable calibration file ({str(exc).splitlines()[0]})") from None
    for field in ("arch", column):
        if field not in rows.columns:
            raise LatencyTableError(f"{path}: column '{field}' is missing")
    rows = rows[pd.to_numeric(rows[column], errors="coerce") > 0].sort_values(column)
    if rows.empty:
        raise LatencyTableError(f"{path}: no calibration subnet with a positive '{column}'")
    picks = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
    space = table.space
    anchors = []
    for i in picks:
        row = rows.iloc[int(i)]
        try:
            arch = Arch.from_json(str(row["arch"]))
            space.validate(arch)
        except Exception as exc:  # a hand-edited or foreign file: name it
            raise LatencyTableError(f"{path}: line {int(rows.index[int(i)]) + 2}: field 'arch' is not an arch of "
                                    f"'{space.name}' ({exc})") from None
        anchors.append((arch, float(row[column])))
    return anchors


def check_drift(table: LatencyTable, profile: Any = None, *, n: int = DEFAULT_ANCHORS,
                rounds: int = DEFAULT_ROUNDS, tolerance: float = DEFAULT_TOLERANCE, backend: Any = None,
                pause_s: float = 3.0, guard: QuietGuard | None = None) -> DriftCheck:
    """Time `n` of the table's calibration subnets on this machine, as the profiler did, and compare.

    The table holds the device's quiet speed (the quietest of interleaved rounds), so the check
    estimates the quiet speed now: a first pass that finds drift beyond the tolerance is repeated
    after `pause_s` and each anchor keeps its quicker time. On the development VM a single pass
    once landed in a slow spell of several seconds and reported 1.68x, where the device's quiet
    speed had changed by a few per cent; scaling by that would have shipped a needlessly small model.

    Refuses a table measured on another device or profile: a ratio against another machine's
    numbers is not drift.
    """
    measure = subnet_timer(table, profile, rounds=rounds, backend=backend, guard=guard)
    anchors = anchor_archs(table, n)
    archs = [arch for arch, _ in anchors]
    then = np.asarray([t for _, t in anchors])
    started = time.perf_counter()
    now = np.asarray(measure(archs))
    passes = 1
    if abs(float(np.median(now / then)) - 1.0) > tolerance:
        time.sleep(pause_s)
        now = np.minimum(now, measure(archs))
        passes = 2
    return DriftCheck(factor=float(np.median(now / then)), arch_ids=[a.arch_id for a in archs],
                      then_ms=then.tolist(), now_ms=now.tolist(), seconds=time.perf_counter() - started,
                      tolerance=tolerance, passes=passes, profile=(table.profile_dict or {}).get("name"),
                      space=table.space_name)


def corrected(table: LatencyTable, check: DriftCheck) -> LatencyTable:
    """The table scaled by the measured factor (a copy; see `LatencyTable.with_drift`)."""
    return table.with_drift(check.factor, {"anchors": len(check.arch_ids), "seconds": round(check.seconds, 2),
                                           "range": [min(check.ratios), max(check.ratios)]})


def apply_drift(table: LatencyTable, check: DriftCheck, *, correct: bool, log: Callable[[str], None],
                warn: Callable[[str], None], label: str = "") -> LatencyTable:
    """Say what `check` found and return the table to predict with in this run.

    Within the tolerance: the table as it is. Beyond it: with `correct`, a copy scaled by the
    measured factor (`corrected`; the table on disk is unchanged and the run records the factor);
    without, the table as it is and a warning that its predictions are off by about that much.
    """
    log(f"{label}{check.describe()}")
    if not check.significant:
        return table
    if correct:
        log(f"  predictions scaled by {check.factor:.3f} for this run (recorded in best.json; the table is "
            "unchanged)")
        return corrected(table, check)
    warn(f"{table.path}: predictions may be off by about {(check.factor - 1) * 100:+.0f} % on this device now "
         "(--drift correct scales them; or profile again)")
    return table
