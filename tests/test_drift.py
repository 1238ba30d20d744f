"""Drift checks and the measured final pick: a table re-timed on its own device, a search ended by timing.

The arithmetic is tested on a device whose speed the test sets (the real ONNX Runtime or torch
backend, its times scaled), so that a factor of 1.5 must come out as 1.5 on a noisy CI machine;
`hwnas latency drift` is also run end to end on real ONNX Runtime sessions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_search import TINY, LookupAccuracy, every_arch, synthetic_table
from test_validate import foreign_copy, profiled_tiny_table

from hwnas.errors import HwnasError, LatencyTableError
from hwnas.latency.backends import Timing
from hwnas.latency.drift import anchor_archs, check_drift, corrected
from hwnas.latency.profiler import calibration_path
from hwnas.latency.table import LatencyTable, meta_path_for
from hwnas.search import evolution_search
from hwnas.search.measured import MEASURED_COLUMN, describe_pick, measured_pick


class FixedSpeedDevice:
    """A device of known speed: each module takes (its parameter count) / `speed` microseconds.

    The module is the real torch module the drift check builds; only the clock is the test's.
    """

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self.calls = 0

    def time_module(self, module, input_shape) -> Timing:
        self.calls += 1
        t = sum(p.numel() for p in module.parameters()) / self.speed * 1e-3
        return Timing(median_ms=t, p10_ms=t, p90_ms=t, mean_ms=t, n=1, min_ms=t)


@pytest.fixture(scope="module")
def table_path(tmp_path_factory) -> Path:
    """A table of a tiny space with 6 calibration subnets, measured on the fixed-speed device."""
    return profiled_tiny_table(tmp_path_factory.mktemp("drift"), "tiny-drift", "onnxruntime-cpu", 6,
                               FixedSpeedDevice())


# ---- the table, scaled ---------------------------------------------------------------------------------------
def test_with_drift_scales_every_prediction_and_leaves_the_table_alone(table_path, tmp_path) -> None:
    table = LatencyTable.load(table_path)
    slower = table.with_drift(1.25, {"anchors": 3})
    archs = [table.space.sample(np.random.default_rng(i)) for i in range(20)]
    assert np.allclose(slower.predict_many(archs), 1.25 * table.predict_many(archs), rtol=1e-12)
    assert slower.predict(archs[0]) == pytest.approx(1.25 * table.predict(archs[0]))
    assert slower.predict_raw(archs[0]) == table.predict_raw(archs[0])  # the measured sum is what it was
    assert np.allclose(slower.latency_range(), 1.25 * np.asarray(table.latency_range()))
    assert table.drift_factor == 1.0 and slower.drift_factor == 1.25 and "drift" not in table.meta
    assert slower.drifted and not table.drifted
    assert "drift=1.250" in repr(slower)
    with pytest.raises(LatencyTableError, match=r"not saved.*drift \(x1\.250\)"):
        slower.save(tmp_path / "t.csv")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LatencyTableError, match="positive number"):
            table.with_drift(bad)


# ---- anchors -------------------------------------------------------------------------------------------------------
def test_anchors_span_the_calibration_subnets_fastest_to_slowest(table_path) -> None:
    table = LatencyTable.load(table_path)
    cal = pd.read_csv(calibration_path(table_path))
    anchors = anchor_archs(table, 3)
    times = [t for _, t in anchors]
    assert len(anchors) == 3 and times == sorted(times)
    assert times[0] == pytest.approx(cal["median_ms"].min()) and times[-1] == pytest.approx(cal["median_ms"].max())
    assert len(anchor_archs(table, 100)) == len(cal)  # no more anchors than calibration subnets


def test_a_missing_or_broken_calibration_file_is_named(table_path, tmp_path) -> None:
    copy = tmp_path / table_path.name
    copy.write_text(table_path.read_text())
    meta_path_for(copy).write_text(meta_path_for(table_path).read_text())
    table = LatencyTable.load(copy)
    with pytest.raises(LatencyTableError, match=rf"{calibration_path(copy)}: no calibration subnets"):
        anchor_archs(table)
    cal = pd.read_csv(calibration_path(table_path))
    cal.drop(columns=["median_ms"]).to_csv(calibration_path(copy), index=False)
    with pytest.raises(LatencyTableError, match="column 'median_ms' is missing"):
        anchor_archs(table)
    cal.assign(arch=cal["arch"].str.replace('"resolution": ', '"resolution": 1')).to_csv(calibration_path(copy),
                                                                                         index=False)
    with pytest.raises(LatencyTableError, match=r"line \d+: field 'arch' is not an arch of 'tiny-drift'"):
        anchor_archs(table)


# ---- the check ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("speed, factor, significant", [(1.0, 1.0, False), (1.0 / 1.5, 1.5, True),
                                                        (1.02, 1 / 1.02, False), (2.0, 0.5, True)])
def test_drift_is_the_speed_change_of_the_device(table_path, speed, factor, significant) -> None:
    table = LatencyTable.load(table_path)
    device = FixedSpeedDevice(speed)
    check = check_drift(table, n=4, rounds=2, backend=device, pause_s=0.0)
    assert device.calls == 4 * 2 * (2 if significant else 1) and check.passes == (2 if significant else 1)
    assert check.factor == pytest.approx(factor, rel=1e-6) and check.significant is significant
    assert np.allclose(check.ratios, factor, rtol=1e-6)
    assert ("slower" if factor > 1 else "faster") in check.describe() or factor == 1.0
    assert json.loads(json.dumps(check.to_dict()))["factor"] == pytest.approx(factor)
    fixed = corrected(table, check)
    arch = table.space.sample(np.random.default_rng(0))
    assert fixed.predict(arch) == pytest.approx(factor * table.predict(arch))
    assert fixed.meta["drift"]["anchors"] == 4


def test_drift_refuses_a_table_of_another_device(table_path, tmp_path) -> None:
    foreign = foreign_copy(table_path, tmp_path)
    with pytest.raises(LatencyTableError, match=rf"{foreign}.*Another Device 1234"):
        check_drift(LatencyTable.load(foreign), backend=FixedSpeedDevice())


def test_latency_drift_cli_times_real_onnx_runtime_sessions(table_path, capsys) -> None:
    """On ONNX Runtime itself the tiny table was not measured, so only the form is certain, not the factor."""
    from hwnas.cli import main

    assert main(["latency", "drift", "--table", str(table_path), "--anchors", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 calibration subnets re-timed" in out and "median ratio" in out
    assert len([line for line in out.splitlines() if " ms then, " in line]) == 3
    assert main(["latency", "drift", "--table", str(table_path), "--anchors", "0"]) == 2
    assert "--anchors and --rounds must be >= 1" in capsys.readouterr().err


# ---- the measured final pick ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def searched():
    table = synthetic_table(TINY)
    archs = every_arch(TINY)
    lat = table.predict_many(archs)
    acc = 50 + 25 * lat / lat.max()
    budget = float(np.quantile(lat, 0.5))
    result = evolution_search(TINY, LookupAccuracy(archs, acc), table, budget, queries=120, seed=0, costs=False)
    return table, budget, result


def _in_budget_by_accuracy(result, budget: float) -> list[str]:
    cand = result.candidates[result.candidates["latency_ms"] <= budget]
    return list(cand.sort_values(["accuracy", "latency_ms"], ascending=[False, True], kind="stable")["arch_id"])


def test_measured_pick_keeps_the_table_best_when_it_meets_the_budget_as_timed(searched) -> None:
    table, budget, result = searched
    timed = []
    picked = measured_pick(result, lambda archs: timed.extend(archs) or [table.predict(a) for a in archs], budget,
                           top_k=4)
    assert len(timed) == 4 and picked.best == result.best
    info = picked.info["measured_pick"]
    assert info["picked_rank"] == 0 and info["met_budget"] and info["timed"] == 4
    assert picked.candidates[MEASURED_COLUMN].notna().sum() == 4
    assert "kept" in describe_pick(picked) and "the most accurate" in describe_pick(picked)


def test_measured_pick_passes_over_candidates_that_run_over_the_budget(searched) -> None:
    """The device runs the table's two best 10 % slower than predicted: the third is kept."""
    table, budget, result = searched
    order = _in_budget_by_accuracy(result, budget)
    slow = set(order[:2])

    def device(archs):
        return [table.predict(a) * (1.1 if a.arch_id in slow else 0.99) for a in archs]

    picked = measured_pick(result, device, budget, top_k=5)
    assert table.predict(result.archs[order[0]]) * 1.1 > budget, "the test needs a best near the budget"
    if table.predict(result.archs[order[1]]) * 1.1 > budget:
        assert picked.best_row["arch_id"] == order[2] and picked.info["measured_pick"]["picked_rank"] == 2
    else:
        assert picked.best_row["arch_id"] == order[1]
    assert picked.info["measured_pick"]["measured_ms"] <= budget
    assert picked.best_row[MEASURED_COLUMN] == picked.info["measured_pick"]["measured_ms"]


def test_measured_pick_keeps_the_fastest_and_says_so_when_none_meets_the_budget(searched) -> None:
    table, budget, result = searched
    picked = measured_pick(result, lambda archs: [2 * table.predict(a) for a in archs], budget, top_k=3)
    info = picked.info["measured_pick"]
    top = _in_budget_by_accuracy(result, budget)[:3]
    fastest = min(top, key=lambda i: table.predict(result.archs[i]))
    assert not info["met_budget"] and picked.best_row["arch_id"] == fastest
    assert "NONE of them met" in describe_pick(picked)
    with pytest.raises(HwnasError, match="top_k >= 1"):
        measured_pick(result, lambda archs: [], budget, top_k=0)
    with pytest.raises(HwnasError, match="returned 0 timings for 3 archs"):
        measured_pick(result, lambda archs: [], budget, top_k=3)


class SlowSpell(FixedSpeedDevice):
    """A device 1.7x slower during its first `calls` timings, then back at its profiled speed."""

    def __init__(self, calls: int) -> None:
        super().__init__(1.0)
        self.slow_calls = calls

    def time_module(self, module, input_shape) -> Timing:
        timing = super().time_module(module, input_shape)
        if self.calls > self.slow_calls:
            return timing
        t = 1.7 * timing.median_ms
        return Timing(median_ms=t, p10_ms=t, p90_ms=t, mean_ms=t, n=1, min_ms=t)


def test_a_slow_spell_during_the_first_pass_is_not_taken_for_drift(table_path) -> None:
    table = LatencyTable.load(table_path)
    check = check_drift(table, n=4, rounds=2, backend=SlowSpell(calls=8), pause_s=0.0)
    assert check.passes == 2 and check.factor == pytest.approx(1.0) and not check.significant
    assert "twice" in check.describe()
    lasting = check_drift(table, n=4, rounds=2, backend=SlowSpell(calls=100), pause_s=0.0)
    assert lasting.passes == 2 and lasting.factor == pytest.approx(1.7) and lasting.significant
