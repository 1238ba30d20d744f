"""Is the machine quiet enough to time on? The other CPUs' busy share, read from /proc/stat, before and during a timing.

A latency table is worth what its timings are, and on a shared machine a timing is polluted by
what else runs: on the 2-vCPU development VM a model timed with more runnable processes than CPUs
ran 2x slower (the timed process is time-sliced), and about 5 % slower with the other vCPU busy
(`benchmarks/slow_mode.py` measures both, interleaved). The guard reads the kernel's own
accounting: per-CPU busy and steal jiffies from /proc/stat, and this process's CPU time from
getrusage, so "the others' share" is the busy time that was not this process's, over the CPUs
this process does not occupy. Before a measurement it waits (bounded, with a progress line
naming the busiest processes) for that share to fall under a threshold; each measurement records
the share it ran under; a measurement that ran busy is a warning, or a refusal to write
(`policy="refuse"`, the CLI's default for profiling; `--allow-busy` lowers it to a warning).
Where /proc/stat cannot be read (not Linux), readings are None and nothing waits.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwnas.errors import HwnasError

PROC_STAT = Path("/proc/stat")
DEFAULT_THRESHOLD = 0.10  # the others may keep a tenth of the spare CPUs busy
DEFAULT_MAX_WAIT_S = 60.0
POLICIES = ("refuse", "warn", "ignore")
# /proc/stat counts in ticks of 10 ms: over a shorter window one tick is a 2 % swing of a CPU, so a
# reading is only judged (the policy applied) over at least this long; `wait` samples this long.
MIN_JUDGED_S = 0.5


class BusyMachineError(HwnasError):
    """The machine stayed busy: a timing made now would measure the other work as much as the model."""


@dataclass(frozen=True)
class CpuSnapshot:
    """Per-CPU jiffies (busy, total, steal) and this process's CPU seconds, at one moment."""

    wall: float
    cpus: dict[str, tuple[int, int, int]]
    own_cpu_s: float


def _read_stat(path: Path = PROC_STAT) -> dict[str, tuple[int, int, int]] | None:
    """{cpuN: (busy, total, steal)} jiffies; None where the file is absent or unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    cpus = {}
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        v = [int(x) for x in values[:8]] + [0] * max(0, 8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        busy = user + nice + system + irq + softirq  # steal is the hypervisor's, not another process's
        cpus[name] = (busy, busy + idle + iowait + steal, steal)
    return cpus or None


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def snapshot(path: Path = PROC_STAT) -> CpuSnapshot | None:
    cpus = _read_stat(path)
    if cpus is None:
        return None
    return CpuSnapshot(time.monotonic(), cpus, _own_cpu_seconds())


@dataclass(frozen=True)
class BusyReading:
    """What the machine did between two snapshots.

    `others` is the share of the CPUs this process does not occupy (all of them minus `threads`)
    that other processes kept busy; `total` the busy share of every CPU; `steal` the share the
    hypervisor took; `own` this process's CPU time over the wall time (1.0: one thread never off
    its CPU).
    """

    seconds: float
    cpus: int
    others: float
    total: float
    steal: float
    own: float

    def to_dict(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 3), "cpus": self.cpus, "others_busy": round(self.others, 4),
                "total_busy": round(self.total, 4), "steal": round(self.steal, 4), "own_cpu": round(self.own, 4)}

    def describe(self) -> str:
        return (f"other CPUs {100 * self.others:.0f} % busy (all {self.cpus} CPUs {100 * self.total:.0f} %, steal "
                f"{100 * self.steal:.1f} %) over {self.seconds:.1f} s")


def reading(before: CpuSnapshot, after: CpuSnapshot, threads: int = 1) -> BusyReading:
    """The busy shares between two snapshots, with this process using `threads` CPUs."""
    names = sorted(set(before.cpus) & set(after.cpus))
    busy = sum(after.cpus[n][0] - before.cpus[n][0] for n in names)
    total = sum(after.cpus[n][1] - before.cpus[n][1] for n in names)
    steal = sum(after.cpus[n][2] - before.cpus[n][2] for n in names)
    seconds = max(after.wall - before.wall, 1e-9)
    if total <= 0:
        return BusyReading(seconds, len(names), 0.0, 0.0, 0.0, 0.0)
    tick = seconds * len(names) / total  # seconds per jiffy, from the clock (USER_HZ is usually 100)
    own = max(after.own_cpu_s - before.own_cpu_s, 0.0)
    others_s = max(busy * tick - own, 0.0)
    spare = max(len(names) - threads, 1) * seconds
    return BusyReading(seconds=seconds, cpus=len(names), others=min(others_s / spare, 1.0), total=busy / total,
                       steal=steal / total, own=own / seconds)


def sample(seconds: float = 0.5, threads: int = 1, path: Path = PROC_STAT) -> BusyReading | None:
    """The machine's busy shares over the next `seconds` (this process idle meanwhile)."""
    before = snapshot(path)
    if before is None:
        return None
    time.sleep(seconds)
    after = snapshot(path)
    return None if after is None else reading(before, after, threads)


def busiest_processes(seconds: float = 0.5, top: int = 3) -> list[tuple[int, str, float]]:
    """(pid, name, CPU share) of the processes that used the most CPU over `seconds`, this one excluded."""

    def times() -> dict[int, tuple[str, int]]:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            name = text[text.find("(") + 1:text.rfind(")")]
            fields = text[text.rfind(")") + 2:].split()
            found[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
        return found

    first = times()
    time.sleep(seconds)
    second = times()
    hz = os.sysconf("SC_CLK_TCK")
    used = [(pid, name, (ticks - first[pid][1]) / hz / seconds) for pid, (name, ticks) in second.items()
            if pid in first and ticks > first[pid][1]]
    return sorted(used, key=lambda u: -u[2])[:top]


@dataclass
class QuietGuard:
    """Waits for a quiet machine before a measurement and records how busy it was during each one.

    `threshold`: the others' busy share above which the machine counts as busy. `max_wait_s`: how
    long `wait()` waits for it to fall under that (0: not at all). `policy`: what a busy
    measurement is: "refuse" (`check` raises BusyMachineError, nothing is written), "warn" (a
    warning is kept in `warnings` and logged) or "ignore" (only recorded). `threads`: the CPUs the
    measured work itself occupies.
    """

    threshold: float = DEFAULT_THRESHOLD
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    policy: str = "warn"
    threads: int = 1
    log: Callable[[str], None] = print
    readings: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    waited_s: float = 0.0
    proc_stat: Path = PROC_STAT

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise HwnasError(f"busy policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0 < self.threshold <= 1:
            raise HwnasError(f"busy threshold must lie in (0, 1], got {self.threshold}")
        if self.max_wait_s < 0:
            raise HwnasError(f"max wait must be >= 0 s, got {self.max_wait_s}")

    @property
    def available(self) -> bool:
        return _read_stat(self.proc_stat) is not None

    def wait(self, what: str = "timing") -> BusyReading | None:
        """Sample the machine; while the others are busier than the threshold, wait (at most `max_wait_s`).

        Returns the last reading. A machine still busy when the wait is over is handled by `policy`.
        """
        now = sample(MIN_JUDGED_S, self.threads, self.proc_stat)
        started = last_line = time.monotonic()
        while now is not None and now.others > self.threshold and time.monotonic() - started < self.max_wait_s:
            if time.monotonic() - last_line >= 5.0 or last_line == started:
                names = ", ".join(f"{name} (pid {pid}, {100 * share:.0f} %)" for pid, name, share in
                                  busiest_processes(0.2))
                self.log(f"  waiting for a quiet machine before {what}: {now.describe()}"
                         + (f"; busiest: {names}" if names else "")
                         + f" ({time.monotonic() - started:.0f} of at most {self.max_wait_s:.0f} s)")
                last_line = time.monotonic()
            now = sample(1.0, self.threads, self.proc_stat)
        self.waited_s += time.monotonic() - started
        if now is not None and now.others > self.threshold:
            self.check(now, f"{what} (after waiting {time.monotonic() - started:.0f} s)")
        return now

    @contextlib.contextmanager
    def measuring(self, what: str = "timing") -> Iterator[list[BusyReading]]:
        """Record the busy shares over the block; the list it yields holds the reading once the block ends."""
        out: list[BusyReading] = []
        before = snapshot(self.proc_stat)
        yield out
        after = snapshot(self.proc_stat)
        if before is not None and after is not None:
            r = reading(before, after, self.threads)
            out.append(r)
            self.readings.append(r.to_dict())
            self.check(r, what)

    def check(self, r: BusyReading, what: str) -> None:
        """Apply the policy to a reading over the threshold (one too short to tell is recorded, not judged)."""
        if r.others <= self.threshold or self.policy == "ignore" or r.seconds < MIN_JUDGED_S:
            return
        message = (f"{what} ran on a busy machine: {r.describe()}, above the {100 * self.threshold:.0f} % a quiet "
                   "one allows")
        if self.policy == "refuse":
            raise BusyMachineError(f"{message}; nothing was written: stop the other work and run again, or pass "
                                   "--allow-busy to keep busy timings (marked as such)")
        self.warnings.append(message)
        self.log(f"  warning: {message}")

    def summary(self) -> dict[str, Any]:
        """What the table's metadata (or a report) records of the machine's state."""
        others = [r["others_busy"] for r in self.readings]
        return {"threshold": self.threshold, "policy": self.policy, "readings": len(others),
                "others_busy_mean": round(sum(others) / len(others), 4) if others else None,
                "others_busy_max": max(others) if others else None, "waited_s": round(self.waited_s, 1),
                "busy_measurements": sum(o > self.threshold for o in others), "warnings": list(self.warnings),
                "proc_stat": self.available}


__all__ = ["DEFAULT_MAX_WAIT_S", "DEFAULT_THRESHOLD", "POLICIES", "BusyMachineError", "BusyReading", "CpuSnapshot",
           "QuietGuard", "busiest_processes", "reading", "sample", "snapshot"]
