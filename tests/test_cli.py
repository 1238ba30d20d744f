"""The CLI as a user meets it: help, an export end to end, and one clear line for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hwnas import spaces
from hwnas.space import Arch


def hwnas(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hwnas.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_clear_line(proc: Any, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_the_commands() -> None:
    proc = hwnas("--help")
    assert proc.returncode == 0
    for command in ("export", "profile", "latency", "train", "search", "demo"):
        assert command in proc.stdout


def test_export_from_a_fresh_supernet_writes_checked_onnx(tmp_path: Path) -> None:
    from exporters.onnx import read_arch

    arch = spaces.get("mbv3-32").sample(3)
    proc = hwnas("export", "--space", "mbv3-32", "--arch", arch.to_json(), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1
    assert read_arch(files[0]) == arch
    assert str(files[0]) in proc.stdout


def test_export_reads_an_arch_file_wrapped_as_best_json(tmp_path: Path, hwnas_cli) -> None:
    arch = spaces.get("mbv3-32").smallest()
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"arch": arch.to_dict(), "predicted_ms": 1.0}))
    proc = hwnas_cli("export", "--space", "mbv3-32", "--arch", str(best), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("mutation", "fragments"),
    [
        ({"space": "mbv3-224"}, ("mbv3-224", "mbv3-32")),
        ({"resolution": 64}, ("resolution 64", "[24, 28, 32]")),
        ({"depths": [2, 2, 2]}, ("depths has 3 entries", "4 stages")),
        ({"kernels": [3] * 7}, ("kernels has 7 entries",)),
        ({"expands": [3] * 7 + [5]}, ("expands[7] = 5", "[3, 4, 6]")),
    ],
)
def test_bad_arch_is_one_clear_line(tmp_path: Path, mutation: dict, fragments: tuple[str, ...], hwnas_cli) -> None:
    data = spaces.get("mbv3-32").smallest().to_dict() | mutation
    proc = hwnas_cli("export", "--space", "mbv3-32", "--arch", json.dumps(data), "--out", str(tmp_path))
    assert_one_clear_line(proc, *fragments)


def test_missing_arch_file_is_one_clear_line(tmp_path: Path, hwnas_cli) -> None:
    proc = hwnas_cli("export", "--space", "mbv3-32", "--arch", str(tmp_path / "nope.json"))
    assert_one_clear_line(proc, "nope.json")


def test_unknown_space_is_one_clear_line(hwnas_cli) -> None:
    arch = Arch("mbv3-32", 28, (2, 2, 2, 2), (3,) * 8, (3,) * 8)
    proc = hwnas_cli("export", "--space", "no-such-space", "--arch", arch.to_json())
    assert_one_clear_line(proc, "no-such-space", "mbv3-32")


def test_missing_dataset_directory_is_one_clear_line(tmp_path: Path, hwnas_cli) -> None:
    missing = tmp_path / "no-such-dir"
    proc = hwnas_cli("train", "--space", "mbv3-32", "--data", f"fashion-mnist:{missing}", "--epochs", "1",
                 "--out", str(tmp_path / "run"))
    assert_one_clear_line(proc, str(missing))
