"""The README's first command, end to end on the shipped supernet, cut to a handful of evaluations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hwnas.cli", "demo", "--quiet", *args], capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for both runs: where no committed table fits this machine, the second reuses the first's."""
    return tmp_path_factory.mktemp("demo")


def test_demo_searches_exports_and_prints_the_summary(out: Path) -> None:
    tmp_path = out
    proc = _demo("--queries", "6", "--val-images", "500", "--measure-top", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "meas/budget", "demo finished in"):
        assert step in out, out
    best = json.loads((tmp_path / "search" / "best.json").read_text())
    report = json.loads((tmp_path / "export" / "deploy.json").read_text())
    assert report["arch_id"] == best["arch_id"]
    assert best["predicted_latency_ms"] <= best["budget_ms"] == report["budget_ms"]
    assert abs(report["val_accuracy"] - best["accuracy"]) <= 0.1, "the export sees the search's BN statistics"
    assert abs(report["test_accuracy_ort"] - report["test_accuracy_torch"]) <= 0.1
    assert report["measured_ms"] > 0 and report["ort_max_abs_diff"] <= 1e-4
    assert (tmp_path / "export" / report["onnx_path"]).is_file()  # named relative to deploy.json's folder
    picked = best["measured_pick"]  # the top candidates were timed here before the export
    assert "in-budget candidates on this device: kept" in out and 1 <= picked["timed"] <= 2
    assert picked["measured_ms"] > 0
    assert (best["arch_id"] == picked["table_best"]) == (picked["picked_rank"] == 0)
    if "  reused " in out:  # a committed table is checked for drift first
        assert "drift: 8 calibration subnets re-timed" in out, out
        drift = best.get("latency_drift")
        undrifted = _undrifted(best, tmp_path / "search")
        assert drift is None or drift["factor"] == pytest.approx(best["predicted_latency_ms"] / undrifted)


def test_demo_budget_below_the_fastest_subnet_names_the_feasible_range(out: Path) -> None:
    proc = _demo("--budget-ms", "0.0001", "--drift", "off", "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "predicted latencies span" in lines[0], proc.stderr


def _undrifted(best: dict, best_dir: Path) -> float:
    """The committed table's own prediction for the best arch, without the drift correction."""
    from hwnas.fileio import resolve_recorded
    from hwnas.latency.table import LatencyTable
    from hwnas.space import Arch

    return LatencyTable.load(resolve_recorded(best["table"], best_dir)).predict(Arch.from_dict(best["arch"]))
