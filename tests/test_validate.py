"""Validation: figures, files, out-of-sample subnets, refusal of foreign tables, resume after interruption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_profiler import PROFILE_TOML, tiny_space

from hwnas.errors import LatencyTableError
from hwnas.latency.profiler import SUBNET_CHUNK, profile_space
from hwnas.latency.table import LatencyTable, meta_path_for
from hwnas.latency.validate import PARTIAL, error_figures, flops_proxy, validate_table


def _identity_field(fp: dict) -> str:
    """A fingerprint field whose change makes another device (the CPU model on a CPU)."""
    from hwnas.latency.device import fingerprint_differences

    for name, value in fp.items():
        if isinstance(value, str) and fingerprint_differences(fp, dict(fp, **{name: "Another Device 1234"}))[0]:
            return name
    raise AssertionError(f"no identity field in {sorted(fp)}")


def profiled_tiny_table(root: Path, name: str, backend: str, calibration_subnets: int, timer: Any = None) -> Path:
    """A tiny space profiled in a second or two with the test profile on `backend` (or on `timer`)."""
    profile = root / f"{name}.toml"
    profile.write_text(PROFILE_TOML.format(backend=backend))
    return profile_space(tiny_space(name), profile, root / "tables", calibration_subnets=calibration_subnets,
                         rounds=1, progress=False, backend=timer)


def foreign_copy(table_path: Path, directory: Path) -> Path:
    """The table (and its calibration subnets) copied into `directory`, claimed for another device."""
    from hwnas.latency.profiler import calibration_path

    meta = json.loads(meta_path_for(table_path).read_text())
    meta["fingerprint"][_identity_field(meta["fingerprint"])] = "Another Device 1234"
    foreign = directory / table_path.name
    foreign.write_text(table_path.read_text())
    meta_path_for(foreign).write_text(json.dumps(meta))
    if calibration_path(table_path).is_file():
        calibration_path(foreign).write_text(calibration_path(table_path).read_text())
    return foreign


@pytest.fixture(scope="module")
def table_path(tmp_path_factory) -> Path:
    return profiled_tiny_table(tmp_path_factory.mktemp("validate"), "tiny-val", "torch-cpu", 4)


def test_error_figures_on_known_numbers() -> None:
    measured = np.array([1.0, 2.0, 3.0, 4.0])
    predicted = measured * np.array([1.04, 0.92, 1.2, 1.0])
    figures = error_figures(predicted, measured)
    assert figures["within_5pct"] == 0.5 and figures["within_10pct"] == 0.75
    assert figures["mape_pct"] == pytest.approx((4 + 8 + 20 + 0) / 4)
    assert figures["max_abs_pct"] == pytest.approx(20)
    assert figures["kendall_tau"] == pytest.approx(1.0)  # the order is kept
    assert error_figures(measured[::-1], measured)["kendall_tau"] == pytest.approx(-1.0)


def test_flops_proxy_recovers_an_exact_line() -> None:
    flops = np.array([1e6, 2e6, 5e6, 9e6])
    predicted, fit = flops_proxy(flops, 0.3 + 2e-7 * flops)
    np.testing.assert_allclose(predicted, 0.3 + 2e-7 * flops, rtol=1e-9)
    assert fit["intercept_ms"] == pytest.approx(0.3) and fit["ms_per_mflop"] == pytest.approx(0.2)


def test_validate_scores_out_of_sample_subnets_and_writes_files(table_path, tmp_path) -> None:
    table = LatencyTable.load(table_path)
    out = tmp_path / "report"
    report = validate_table(table, n=6, out_dir=out, rounds=1)
    rows = pd.read_csv(out / "validation.csv")
    assert len(rows) == 6 == report.lut["n"]
    assert not set(rows["arch_id"]) & set(table.calibration["arch_ids"])  # out of sample
    np.testing.assert_allclose(rows["predicted"], table.predict_many(
        [table.space.arch_from_dict(json.loads(a)) for a in rows["arch"]]), rtol=1e-5)
    assert (rows["p10"] <= rows["measured"]).all() and (rows["measured"] <= rows["p90"]).all()
    assert (rows["flops"] > 0).all()
    figures = json.loads((out / "validation.json").read_text())
    for name in ("lut", "flops_proxy"):
        assert set(figures[name]) >= {"mape_pct", "within_5pct", "within_10pct", "kendall_tau", "max_abs_pct"}
    assert "in sample" in figures["flops_proxy_fit"]["note"]
    assert (out / "validation.png").stat().st_size > 10_000
    assert not (out / PARTIAL).exists()


def test_validate_refuses_a_table_from_another_device(table_path, tmp_path) -> None:
    foreign = foreign_copy(table_path, tmp_path)
    with pytest.raises(LatencyTableError, match=rf"{foreign}.*Another Device 1234.*allow_mismatch=True"):
        validate_table(foreign, n=3, rounds=1)
    report = validate_table(foreign, n=3, rounds=1, allow_mismatch=True)
    assert any("Another Device 1234" in w for w in report.warnings)


class StopAfter:
    """The real backend, interrupted (as by Ctrl-C) after `calls` timings."""

    def __init__(self, backend, calls: int) -> None:
        self.backend, self.calls = backend, calls

    def time_module(self, module, input_shape):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.backend.time_module(module, input_shape)


def test_interrupted_validation_resumes_without_measuring_again(table_path, tmp_path) -> None:
    from hwnas.latency.backends import get_backend

    table = LatencyTable.load(table_path)
    out = tmp_path / "report"
    real = get_backend(table.profile)
    n = SUBNET_CHUNK + 2  # one whole group of subnets, then two more
    with pytest.raises(KeyboardInterrupt):
        validate_table(table, n=n, out_dir=out, rounds=1, backend=StopAfter(real, SUBNET_CHUNK + 1))
    partial = pd.read_csv(out / PARTIAL)
    assert len(partial) == SUBNET_CHUNK
    counting = StopAfter(real, 2)  # exactly the two subnets left may be measured
    validate_table(table, n=n, out_dir=out, rounds=1, backend=counting)
    assert counting.calls == 0
    rows = pd.read_csv(out / "validation.csv").set_index("arch_id")
    np.testing.assert_allclose(rows.loc[partial["arch_id"], "measured"], partial["measured"], rtol=1e-5)
    assert not (out / PARTIAL).exists()


def test_a_min_statistic_profile_runs_end_to_end(tmp_path) -> None:
    profile = tmp_path / "test-min.toml"
    profile.write_text(PROFILE_TOML.format(backend="torch-cpu").replace('"median"', '"min"').replace("test-cpu",
                                                                                                   "test-min"))
    path = profile_space(tiny_space("tiny-min"), profile, tmp_path, calibration_subnets=4, rounds=2, progress=False)
    table = LatencyTable.load(path)
    assert table.statistic_column == "min_ms"
    assert (table.rows["min_ms"] <= table.rows["median_ms"]).all()
    report = validate_table(table, n=3, rounds=2)
    assert (report.rows["measured"] <= report.rows["p90"]).all() and report.statistic == "min"


def test_no_measure_scores_what_an_interrupted_validation_left(table_path, tmp_path) -> None:
    from hwnas.latency.backends import get_backend

    table = LatencyTable.load(table_path)
    out = tmp_path / "report"
    n = SUBNET_CHUNK + 2
    with pytest.raises(LatencyTableError, match="no measurements of an earlier validation"):
        validate_table(table, n=n, out_dir=out, measure=False)
    with pytest.raises(KeyboardInterrupt):
        validate_table(table, n=n, out_dir=out, rounds=1,
                       backend=StopAfter(get_backend(table.profile), SUBNET_CHUNK + 1))
    partial = pd.read_csv(out / PARTIAL)
    report = validate_table(table, n=n, out_dir=out, measure=False)  # no backend is touched
    assert len(report.rows) == len(partial) == SUBNET_CHUNK
    assert any(f"scored {SUBNET_CHUNK} of {n}" in w for w in report.warnings)
    assert set(report.rows["arch_id"]) == set(partial["arch_id"].astype(str))
    assert (out / "validation.json").is_file() and (out / PARTIAL).exists()  # a later run can still finish it
