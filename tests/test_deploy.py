"""Export of searched subnets from the shipped supernet: verified files, the same accuracy the search saw,
figures in the metadata, and a deploy family exported in one command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.onnx import read_arch, read_metadata
from hwnas.checkpoint import load_supernet
from hwnas.data import load_dataset
from hwnas.demo import shipped_supernet
from hwnas.deploy import EvalSettings, deploy
from hwnas.latency.backends import Timing
from hwnas.latency.profiles import load_profile
from hwnas.latency.table import LatencyTable
from hwnas.search.evaluate import SupernetEvaluator
from hwnas.supernet import Supernet

SHIPPED = shipped_supernet()
SETTINGS = EvalSettings(bn_batches=2, bn_batch_size=128, seed=3, batch_size=500, val_batches=2)


@pytest.fixture(scope="module")
def shipped() -> Supernet:
    supernet, _ = load_supernet(SHIPPED, space_name="mbv3-32")
    return supernet.eval()


@pytest.fixture(scope="module")
def fmnist():  # noqa: ANN201
    return load_dataset("fashion-mnist", val_size=5000, seed=0)


def test_five_archs_export_with_checker_and_onnx_runtime_parity(shipped: Supernet, tmp_path: Path) -> None:
    space = shipped.space
    rng = np.random.default_rng(0)
    archs = [space.smallest(), space.largest(), *(space.sample(rng) for _ in range(3))]
    assert len({a.arch_id for a in archs}) == 5
    for arch in archs:
        report = deploy(shipped, arch, tmp_path / arch.arch_id, log=lambda *_: None)
        onnx.checker.check_model(onnx.load(report.onnx_path), full_check=True)
        assert report.ort_max_abs_diff <= 1e-4
        assert read_arch(report.onnx_path) == arch


def test_exported_accuracy_is_what_the_supernet_evaluator_measured(shipped: Supernet, fmnist, tmp_path: Path) -> None:
    arch = shipped.space.sample(np.random.default_rng(7))
    kwargs = dict(batch_size=SETTINGS.batch_size, max_batches=SETTINGS.val_batches, bn_batches=SETTINGS.bn_batches,
                  bn_batch_size=SETTINGS.bn_batch_size, seed=SETTINGS.seed)
    on_val = SupernetEvaluator(shipped, fmnist.val, fmnist.train, **kwargs).evaluate(arch)
    on_test = SupernetEvaluator(shipped, fmnist.test, fmnist.train, **kwargs).evaluate(arch)
    report = deploy(shipped, arch, tmp_path, dataset=fmnist, settings=SETTINGS, search_accuracy=on_val,
                    test_batches=SETTINGS.val_batches, log=lambda *_: None)
    assert on_val > 50, "the shipped supernet is trained: a subnet is far above chance (10 %)"
    assert abs(report.val_accuracy - on_val) <= 0.1
    assert abs(report.test_accuracy_torch - on_test) <= 0.1
    assert abs(report.test_accuracy_ort - report.test_accuracy_torch) <= 0.1
    assert not report.warnings


def test_figures_round_trip_through_the_onnx_metadata_and_deploy_json(shipped: Supernet, fmnist,
                                                                     tmp_path: Path) -> None:
    arch = shipped.space.smallest()
    profile = load_profile("cpu-onnxruntime")
    report = deploy(shipped, arch, tmp_path, dataset=fmnist, settings=SETTINGS, profile=profile, budget_ms=1e-3,
                    test_batches=1, metadata={"source": "test"}, log=lambda *_: None)
    meta = read_metadata(report.onnx_path)
    assert float(meta["hwnas.test_accuracy_ort"]) == pytest.approx(report.test_accuracy_ort, abs=1e-4)
    assert float(meta["hwnas.val_accuracy"]) == pytest.approx(report.val_accuracy, abs=1e-4)
    assert float(meta["hwnas.measured_latency_ms"]) == pytest.approx(report.measured_ms, rel=1e-4)
    assert meta["hwnas.budget_ms"] == "0.001" and meta["hwnas.source"] == "test"
    assert meta["hwnas.bn_seed"] == "3" and meta["hwnas.profile"] == "cpu-onnxruntime"
    assert read_arch(report.onnx_path) == arch
    saved = json.loads((tmp_path / "deploy.json").read_text())
    assert saved["arch_id"] == arch.arch_id and saved["measured_ms"] == report.measured_ms
    # a 1 us budget cannot be met: the report says so rather than passing quietly
    assert report.over_budget and any("OVER the budget" in w for w in report.warnings)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hwnas.cli", *args], capture_output=True, text=True, timeout=600)


def test_tensorrt_export_without_tensorrt_stops_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here: the missing-runtime message cannot be seen")
    except ImportError:
        pass
    arch = _smallest_json()
    proc = _cli("export", "--space", "mbv3-32", "--arch", arch, "--format", "tensorrt", "--out", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "TensorRT" in lines[0], proc.stderr


def _smallest_json() -> str:
    from hwnas import spaces

    return spaces.get("mbv3-32").smallest().to_json()


def _synthetic_table(space, path: Path, scale: float, slug: str) -> Path:  # noqa: ANN001
    """A device where bigger blocks are slower; `scale` makes a second, slower device."""
    table = LatencyTable.new(space, profile=None, fingerprint={"cpu": slug}, device_slug=slug)
    for spec in space.all_blocks():
        t = scale * (0.01 + spec.in_size**2 * (spec.cin + spec.cout) * (spec.kernel**2 + spec.hidden) * 1e-7)
        table.record(spec, Timing(median_ms=t, p10_ms=0.9 * t, p90_ms=1.1 * t, mean_ms=t, n=5))
    return table.save(path)


def test_family_search_then_export_all(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two tables (devices) x two budgets: four archs from one supernet, each exported and verified."""
    space = load_supernet(SHIPPED)[0].space
    tables = [_synthetic_table(space, tmp_path / f"dev{i}.csv", scale=1.0 + i, slug=f"dev{i}") for i in range(2)]
    low, high = LatencyTable.load(tables[0]).latency_range(space)
    budgets = [f"{low + (high - low) * f:.4g}" for f in (0.3, 0.6)]
    out = tmp_path / "family"
    from hwnas.cli import main  # in this process: the same code as the command, without a second torch import

    assert main(["search", "--supernet", str(SHIPPED), "--table", *map(str, tables), "--budget-ms", *budgets,
                 "--queries", "6", "--val-batches", "1", "--bn-batches", "1", "--out", str(out), "--quiet"]) == 0
    family = json.loads((out / "family.json").read_text())
    assert len(family) == 4 and {r["device_slug"] for r in family} == {"dev0", "dev1"}
    for row in family:
        best = json.loads((out / row["dir"] / "best.json").read_text())
        assert best["predicted_latency_ms"] <= row["budget_ms"]
    capsys.readouterr()
    assert main(["export", "--supernet", str(SHIPPED), "--arch", str(out), "--test-batches", "1",
                 "--out", str(tmp_path / "exports")]) == 0
    printed = capsys.readouterr().out
    for row in family:
        report = json.loads((tmp_path / "exports" / row["dir"] / "deploy.json").read_text())
        assert report["arch_id"] == row["best_arch_id"] and report["ort_max_abs_diff"] <= 1e-4
        assert report["predicted_ms"] == pytest.approx(row["predicted_latency_ms"], rel=1e-6)
    assert printed.count("mbv3-32_") >= 4, "one summary line per exported arch"
