"""LatencyTable: prediction, calibration, exact latency range, refusal of foreign tables, corrupt files."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest

from hwnas.errors import LatencyTableError
from hwnas.latency.backends import Timing
from hwnas.latency.table import LatencyTable, meta_path_for
from hwnas.space import Arch, SearchSpace, StageSpec


def tiny_space(name: str = "tiny", stages: int = 2, out: int = 16) -> SearchSpace:
    return SearchSpace(
        name=name, in_channels=3, num_classes=4, stem_channels=8, stem_stride=2, stem_act="hswish",
        first_channels=8,
        stages=tuple(StageSpec(out + 8 * i, stride=2 if i == 0 else 1, act="hswish", se=i == 1)
                     for i in range(stages)),
        final_expand_channels=32, feature_channels=48, head_act="hswish",
        kernel_choices=(3, 5), expand_choices=(2, 4), depth_choices=(1, 2), resolution_choices=(12, 16),
    )


def all_archs(space: SearchSpace) -> list[Arch]:
    """Every distinct subnet of a (tiny) space, by brute force."""
    block_choices = list(itertools.product(space.kernel_choices, space.expand_choices))
    per_stage = [list(itertools.chain.from_iterable(itertools.product(block_choices, repeat=d)
                                                    for d in space.depth_choices))
                 for _ in space.stages]
    archs = []
    for resolution in space.resolution_choices:
        for stage_blocks in itertools.product(*per_stage):
            depths = tuple(len(b) for b in stage_blocks)
            flat = [blk for blocks in stage_blocks for blk in blocks]
            archs.append(Arch(space.name, resolution, depths, tuple(k for k, _ in flat), tuple(e for _, e in flat)))
    assert len(archs) == space.size()
    return archs


def synthetic_latency(spec) -> float:
    """Bigger blocks are slower: time grows with pixels, channels, kernel and expansion."""
    pixels = spec.in_size**2
    base = {"stem": 0.05, "first": 0.04, "head": 0.2}.get(spec.kind, 0.0)
    work = pixels * (spec.cin + spec.cout) * (spec.kernel**2 + 2 * max(spec.hidden, spec.cin)) * 1e-7
    return base + 0.01 + work + (0.02 if spec.se else 0.0)


def synthetic_table(space: SearchSpace, skip: str | None = None) -> LatencyTable:
    table = LatencyTable.new(space, profile=None, fingerprint={"cpu": "synthetic"}, device_slug="synthetic")
    for spec in space.all_blocks():
        if spec.key != skip:
            t = synthetic_latency(spec)
            table.record(spec, Timing(median_ms=t, p10_ms=0.9 * t, p90_ms=1.2 * t, mean_ms=1.05 * t, n=5))
    return table


def calibrated_table(space: SearchSpace, kind: str = "auto") -> LatencyTable:
    """A table calibrated on 'measurements' that pay a fixed saving per block, as a real runtime does."""
    table = synthetic_table(space)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(40)]
    measured = [(a, 0.8 * table.predict_raw(a) + 0.05 - 0.004 * sum(a.depths)) for a in archs]
    table.fit_calibration(measured, kind=kind)
    return table


def test_latency_range_is_exact_against_brute_force() -> None:
    space = tiny_space()
    for table in (synthetic_table(space), calibrated_table(space)):
        predictions = table.predict_many(all_archs(space))
        low, high = table.latency_range(space)
        assert low == pytest.approx(predictions.min(), rel=1e-12)
        assert high == pytest.approx(predictions.max(), rel=1e-12)


def test_predict_is_the_calibration_applied_to_the_block_sum() -> None:
    space = tiny_space()
    table = calibrated_table(space, kind="linear")
    coeffs = table.calibration["coefficients"]
    a, b = coeffs["scale"]["mbconv"], coeffs["intercept"]
    assert a > 0 and table.calibration["kind"] == "linear"
    for arch in [space.sample(i) for i in range(20)]:
        raw = sum(synthetic_latency(spec) for spec in space.blocks(arch))
        assert table.predict_raw(arch) == pytest.approx(raw, rel=1e-12)
        assert table.predict(arch) == pytest.approx(a * raw + b, rel=1e-12)


def test_auto_calibration_finds_the_per_block_term_and_reports_residuals() -> None:
    space = tiny_space()
    table = calibrated_table(space)
    cal = table.calibration
    assert cal["kind"] in ("linear+blocks", "per-kind")
    coeffs = cal["coefficients"]
    assert coeffs["scale"]["mbconv"] == pytest.approx(0.8, rel=1e-3)
    assert coeffs["per_block"]["mbconv"] == pytest.approx(-0.004, rel=1e-2)
    assert cal["n_subnets"] == 40 and cal["residuals"]["max_abs_pct"] < 0.1
    assert cal["loo"]["linear+blocks"]["mape_pct"] < cal["uncalibrated"]["mape_pct"]


def test_predict_many_matches_predict_and_survives_a_round_trip(tmp_path) -> None:
    space = tiny_space()
    table = calibrated_table(space)
    archs = [space.sample(i) for i in range(50)]
    expected = np.array([table.predict(a) for a in archs])
    np.testing.assert_allclose(table.predict_many(archs), expected, rtol=1e-12)
    path = table.save(tmp_path / "t" / "dev__p.csv")
    assert sorted(p.name for p in path.parent.iterdir()) == ["dev__p.csv", "dev__p.meta.json"]  # no temp files
    loaded = LatencyTable.load(path)
    np.testing.assert_allclose(loaded.predict_many(archs), expected, rtol=1e-5)
    assert loaded.calibration["kind"] == table.calibration["kind"]
    assert loaded.space == space and loaded.space_name == "tiny"


def test_bigger_block_never_predicts_faster() -> None:
    space = tiny_space()
    table = calibrated_table(space, kind="per-kind")
    rng = np.random.default_rng(3)
    for _ in range(100):
        arch = space.sample(rng)
        i = int(rng.integers(len(arch.kernels)))
        kernels, expands = list(arch.kernels), list(arch.expands)
        kernels[i], expands[i] = min(space.kernel_choices), min(space.expand_choices)
        small = Arch(space.name, arch.resolution, arch.depths, tuple(kernels), tuple(expands))
        kernels[i], expands[i] = max(space.kernel_choices), max(space.expand_choices)
        large = Arch(space.name, arch.resolution, arch.depths, tuple(kernels), tuple(expands))
        assert table.predict(large) > table.predict(small)


def test_missing_key_is_named() -> None:
    space = tiny_space()
    largest = space.largest()
    victim = [s for s in space.blocks(largest) if s.kind == "mbconv"][-1].key
    table = synthetic_table(space, skip=victim)
    assert table.missing_keys(space) == [victim]
    with pytest.raises(LatencyTableError, match=victim):
        table.predict(largest)
    with pytest.raises(LatencyTableError, match=victim):
        table.predict_many([space.smallest(), largest])
    table.predict(space.smallest())  # other archs still predict


def test_table_of_another_space_is_refused_unless_allowed() -> None:
    table = synthetic_table(tiny_space())
    with pytest.raises(LatencyTableError, match=r"space name 'tiny' != 'other'.*allow-mismatch"):
        table.check_target(tiny_space(name="other"))
    with pytest.raises(LatencyTableError, match="space stages"):
        table.check_target(tiny_space(out=24))
    assert table.check_target(tiny_space()) == []
    diffs = table.check_target(tiny_space(out=24), allow_mismatch=True)
    assert any("stages" in d for d in diffs)


def test_table_from_another_device_is_refused_unless_allowed(tmp_path) -> None:
    from hwnas.latency.device import fingerprint
    from hwnas.latency.profiles import load_profile

    profile = load_profile("cpu-onnxruntime")
    space = tiny_space()
    here = fingerprint(profile)
    table = LatencyTable.new(space, profile, here, "dev")
    assert table.check_target(space, profile, here) == []
    elsewhere = json.loads(json.dumps(here))
    changed = next(k for k in ("cpu_model", "cpu", "gpu_name", "machine") if k in elsewhere)
    elsewhere[changed] = "Some Other Processor 9000"
    table.meta["fingerprint"] = elsewhere
    path = table.save(tmp_path / "dev__cpu.csv")
    table = LatencyTable.load(path)
    with pytest.raises(LatencyTableError, match=f"{path}.*Some Other Processor 9000.*allow_mismatch=True"):
        table.check_target(space, profile, here)
    diffs = table.check_target(space, profile, here, allow_mismatch=True)
    assert any("Some Other Processor 9000" in d for d in diffs)


def _saved(tmp_path) -> tuple:
    table = synthetic_table(tiny_space())
    path = table.save(tmp_path / "dev__p.csv")
    return path, meta_path_for(path)


@pytest.mark.parametrize("damage, where, field", [
    (lambda csv, meta: pd.read_csv(csv).drop(columns="p10_ms").to_csv(csv, index=False), "csv", "p10_ms"),
    (lambda csv, meta: pd.read_csv(csv).astype({"n": object}).assign(n=lambda f: ["five", *f["n"][1:]])
     .to_csv(csv, index=False), "csv", "'n'"),
    (lambda csv, meta: pd.read_csv(csv).assign(median_ms="fast").to_csv(csv, index=False), "csv", "median_ms"),
    (lambda csv, meta: meta.write_text(meta.read_text()[:-20]), "meta", "not valid JSON"),
    (lambda csv, meta: meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                                   if k != "fingerprint"})), "meta", "fingerprint"),
    (lambda csv, meta: meta.write_text(meta.read_text().replace('"intercept": 0.0', '"intercept": "x"')),
     "meta", "calibration.coefficients.intercept"),
    (lambda csv, meta: meta.unlink(), "meta", "missing"),
    (lambda csv, meta: csv.write_text(""), "csv", "empty"),
])
def test_corrupt_files_name_the_file_and_field(tmp_path, damage, where, field) -> None:
    csv, meta = _saved(tmp_path)
    damage(csv, meta)
    with pytest.raises(LatencyTableError) as info:
        LatencyTable.load(csv)
    message = str(info.value)
    assert str(csv if where == "csv" else meta) in message
    assert field in message
    assert "\n" not in message


def test_calibration_of_unknown_kind_is_refused() -> None:
    table = synthetic_table(tiny_space())
    with pytest.raises(LatencyTableError, match="unknown calibration kind 'cubic'"):
        table.fit_calibration([(tiny_space().smallest(), 1.0)], kind="cubic")


def test_a_calibration_file_passed_as_the_table_names_its_table(tmp_path) -> None:
    csv, _ = _saved(tmp_path)
    calibration = csv.with_name("dev__p.calibration.csv")  # what `--table dir/*p*.csv` picks first
    calibration.write_text("arch_id,measured_ms\n")
    with pytest.raises(LatencyTableError, match=rf"calibration file of the table {re.escape(str(csv))}; pass that"):
        LatencyTable.load(calibration)
