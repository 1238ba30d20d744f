"""What `hwnas export` takes from a run record and a checkpoint: the validation split's size (--val-size, else the
record's, else the checkpoint's, else 5000) and the supernet the search used (found relative to the record's
folder, or as given for older records; one line when it is gone), so `hwnas export --arch RESULTS` runs without
--supernet. (`tests/test_deploy.py` runs a real family search and its export.)

Every export here is of the shipped supernet's smallest arch with one BN batch, one validation batch and one
test batch (or no data at all), so each costs a few seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hwnas.runrecord import FamilyEntry, RunRecord, write_family

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hwnas" / "checkpoints" / "mbv3-32_fashion-mnist.pt"
SMALLEST = {"space": "mbv3-32", "resolution": 24, "depths": [2, 2, 2, 2], "expands": [3] * 8, "kernels": [3] * 8}
FAST = dict(space="mbv3-32", dataset="fashion-mnist", val_batches=1, batch_size=500, bn_batches=1, bn_batch_size=128)


def _record(path: Path, **fields: object) -> Path:
    return RunRecord(arch=SMALLEST, **{**FAST, **fields}).write(path)  # type: ignore[arg-type]


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ---- --val-size -------------------------------------------------------------------------------------------------
def test_without_val_size_the_export_carves_the_split_the_checkpoint_was_trained_with(hwnas_cli,  # noqa: ANN001
                                                                                      tmp_path: Path) -> None:
    state = torch.load(SHIPPED, weights_only=True)
    state["val_size"] = 3000  # what hwnas train records of its split
    ckpt = tmp_path / "ckpt" / "supernet.pt"
    ckpt.parent.mkdir()
    torch.save(state, ckpt)
    best = _record(tmp_path / "run" / "best.json", supernet=str(ckpt), val_size=None)  # a search given no --val-size
    result = hwnas_cli("export", "--arch", str(best), "--test-batches", "1", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "deploy.json").read_text())["val_size"] == 3000


def test_val_size_is_the_flag_else_the_record_else_the_checkpoint_else_5000() -> None:
    from hwnas.data.readers import first_val_size

    def _val_size(given: object, record: RunRecord, state: dict) -> int | float:  # the export's order
        return first_val_size(given, record.val_size, state.get("val_size"))

    record = RunRecord(arch=SMALLEST, val_size=4000)
    assert _val_size(1000, record, {"val_size": 3000}) == 1000
    assert _val_size(None, record, {"val_size": 3000}) == 4000
    assert _val_size(None, RunRecord(arch=SMALLEST), {"val_size": 3000}) == 3000
    assert _val_size(None, RunRecord(arch=SMALLEST), {"val_size": None}) == 5000
    assert _val_size(0.1, record, {}) == 0.1 and isinstance(_val_size(None, RunRecord(arch=SMALLEST, val_size=2000.0),
                                                                      {}), int)


def test_a_val_size_the_data_cannot_hold_is_one_line_and_writes_nothing(hwnas_cli, tmp_path: Path) -> None:  # noqa: ANN001
    best = _record(tmp_path / "best.json", supernet=str(SHIPPED))
    result = hwnas_cli("export", "--arch", str(best), "--val-size", "70000", "--out", str(tmp_path / "out"))
    line = _one_line(result.stderr)
    assert result.returncode == 2 and "val_size 70000" in line and "60000" in line, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [-1, 0, 1.5, 1.0 + 1e-9])
def test_a_val_size_that_is_neither_a_count_nor_a_fraction_is_refused(value: float) -> None:
    from hwnas.errors import HwnasError
    from hwnas.export_pipeline import ExportRequest

    with pytest.raises(HwnasError, match="--val-size must be a number of images"):
        ExportRequest(arch="{}", val_size=value).check()
    assert ExportRequest(arch="{}", val_size=0.1).check().val_size == 0.1


# ---- the recorded supernet --------------------------------------------------------------------------------------
def test_a_moved_results_folder_finds_its_supernet_relative_to_the_record(hwnas_cli, tmp_path: Path) -> None:  # noqa: ANN001
    """best.json names the checkpoint relative to its own folder; the export runs from elsewhere (the repository)."""
    shutil.copy(SHIPPED, tmp_path / "supernet.pt")
    results = tmp_path / "results"
    _record(results / "run1" / "best.json", supernet="../../supernet.pt")
    write_family(results, [FamilyEntry(dir="run1", table="t.csv", device_slug="dev", profile=None, budget_ms=1.0,
                                       best_arch_id="x", predicted_latency_ms=None, accuracy=None)])
    assert not Path("../../supernet.pt").is_file(), "the working directory must not resolve it"
    for arch, out in ((results / "run1", tmp_path / "one"), (results, tmp_path / "family")):
        result = hwnas_cli("export", "--arch", str(arch), "--data", "none", "--out", str(out))
        assert result.returncode == 0, result.stderr
        report = next(out.rglob("deploy.json"))
        assert (report.parent / json.loads(report.read_text())["onnx_path"]).is_file()
    assert (tmp_path / "family" / "run1" / "deploy.json").is_file()


def test_a_recorded_supernet_that_is_gone_is_one_line_and_writes_nothing(hwnas_cli, tmp_path: Path) -> None:  # noqa: ANN001
    best = _record(tmp_path / "results" / "best.json", supernet="runs/gone/supernet.pt")
    result = hwnas_cli("export", "--arch", str(tmp_path / "results"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "records supernet 'runs/gone/supernet.pt', which is not there" in line and "--supernet CKPT" in line
    assert str(best.parent.name) in line and not (tmp_path / "out").exists()


