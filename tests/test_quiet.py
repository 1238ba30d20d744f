"""The quiet-machine guard on real /proc readings: it sees a CPU this test makes busy, waits, refuses or warns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_profiler import PROFILE_TOML, tiny_space

from hwnas.latency.profiler import profile_space
from hwnas.latency.quiet import BusyMachineError, QuietGuard, reading, sample, snapshot
from hwnas.latency.table import LatencyTable

pytestmark = pytest.mark.skipif(not Path("/proc/stat").is_file() or (os.cpu_count() or 1) < 2,
                                reason="the guard reads /proc/stat and needs a second CPU to watch")


def stat_file(path: Path, cpu0: tuple[int, ...], cpu1: tuple[int, ...]) -> Path:
    """A /proc/stat with two CPUs: (user, nice, system, idle, iowait, irq, softirq, steal) jiffies each."""
    total = tuple(a + b for a, b in zip(cpu0, cpu1, strict=True))
    path.write_text("\n".join(f"{name} {' '.join(map(str, v))} 0 0" for name, v in
                              (("cpu", total), ("cpu0", cpu0), ("cpu1", cpu1))) + "\nintr 1\n")
    return path


def test_reading_splits_busy_time_into_this_process_the_others_and_steal(tmp_path: Path) -> None:
    a = snapshot(stat_file(tmp_path / "a", (100, 0, 0, 100, 0, 0, 0, 0), (0, 0, 0, 200, 0, 0, 0, 0)))
    b = snapshot(stat_file(tmp_path / "b", (200, 0, 0, 100, 0, 0, 0, 0), (50, 0, 30, 210, 0, 0, 0, 10)))
    assert a is not None and b is not None
    r = reading(a, b, threads=1)
    assert r.cpus == 2 and r.total == pytest.approx(180 / 200) and r.steal == pytest.approx(10 / 200)
    assert 0 <= r.others <= 1 and r.to_dict()["others_busy"] == round(r.others, 4)


@pytest.fixture()
def busy_cpu():
    """Another process spinning on a CPU for as long as the test runs."""
    child = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    time.sleep(0.5)
    yield child
    child.kill()
    child.wait()


def test_the_guard_sees_a_busy_cpu_waits_then_refuses(busy_cpu: subprocess.Popen) -> None:
    lines: list[str] = []
    guard = QuietGuard(policy="refuse", max_wait_s=1.0, log=lines.append)
    started = time.monotonic()
    with pytest.raises(BusyMachineError, match=r"timing \(after waiting 1 s\) ran on a busy machine: other CPUs "
                                               r"\d+ % busy.*--allow-busy"):
        guard.wait("timing")
    assert time.monotonic() - started >= 1.0, "it waited for the machine to quiet down first"
    assert lines and "waiting for a quiet machine" in lines[0] and f"pid {busy_cpu.pid}" in lines[0]


def test_the_guard_warns_when_allowed_and_passes_once_the_machine_is_quiet(busy_cpu: subprocess.Popen) -> None:
    lines: list[str] = []
    guard = QuietGuard(policy="warn", max_wait_s=0.0, log=lines.append)
    busy = guard.wait("timing")
    assert busy is not None and busy.others > 0.5 and guard.warnings and "warning:" in lines[-1]
    busy_cpu.kill()
    busy_cpu.wait()
    quiet = sample(1.0)
    assert quiet is not None and quiet.others < 0.5


def test_a_profile_records_the_busy_share_and_refuses_to_write_a_busy_group(tmp_path: Path) -> None:
    profile = tmp_path / "test-cpu.toml"
    profile.write_text(PROFILE_TOML.format(backend="torch-cpu"))
    guard = QuietGuard(policy="warn", max_wait_s=0.0, log=lambda line: None)
    path = profile_space(tiny_space(), profile, tmp_path / "quiet", calibration_subnets=2, rounds=1, progress=False,
                         guard=guard)
    table = LatencyTable.load(path)
    quiet = table.meta["quiet"]
    assert quiet["readings"] >= 2 and quiet["policy"] == "warn" and quiet["others_busy_max"] is not None
    assert "others_busy" in table.rows.columns and table.rows["rounds"].min() >= 1

    child = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    try:
        time.sleep(0.5)
        refusing = QuietGuard(policy="refuse", max_wait_s=0.0, log=lambda line: None)
        with pytest.raises(BusyMachineError):
            profile_space(tiny_space("tiny-busy"), profile, tmp_path / "busy", calibration_subnets=2, rounds=1,
                          progress=False, guard=refusing)
    finally:
        child.kill()
        child.wait()
    (busy_table,) = (tmp_path / "busy" / "tiny-busy").glob("*.csv")
    assert len(LatencyTable.load(busy_table)) == 0, "no row timed on the busy machine was written"
