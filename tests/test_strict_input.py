"""Input that used to be coerced or ignored into a silent wrong answer is refused in one line, nothing written:
arch JSON that is not exactly an arch, a non-positive export budget or test-batch count, a demo validation size
that is not whole batches, a training subset larger than the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hwnas.arch import Arch
from hwnas.errors import ArchError

ROOT = Path(__file__).resolve().parents[1]
SUPERNET = ROOT / "hwnas" / "checkpoints" / "mbv3-32_fashion-mnist.pt"
GOOD = {"space": "mbv3-32", "resolution": 28, "depths": [2, 2, 2, 2], "kernels": [3] * 8, "expands": [3] * 8}


@pytest.mark.parametrize(("change", "message"), [
    ({"depths": [2.9, 2, 2, 2]}, "'depths' must be a list of whole numbers"),
    ({"kernels": "33333333"}, "'kernels' must be a list of whole numbers"),
    ({"resolution": "28"}, "'resolution' must be a whole number"),
    ({"resolution": True}, "'resolution' must be a whole number"),
    ({"expands": [3, 3, 3, 3, 3, 3, 3, float("nan")]}, "'expands' must be a list of numbers"),
    ({"width": 2}, "unknown field(s): width"),
    ({"space": 32}, "'space' must be a string"),
])
def test_an_arch_is_read_exactly_or_refused(change: dict[str, Any], message: str) -> None:
    assert Arch.from_dict(GOOD).depths == (2, 2, 2, 2)
    with pytest.raises(ArchError) as raised:
        Arch.from_dict({**GOOD, **change})
    assert message in str(raised.value)


@pytest.mark.parametrize(("args", "message"), [
    (["export", "--supernet", str(SUPERNET), "--arch", json.dumps({**GOOD, "depths": [2.9, 2, 2, 2]})],
     "'depths' must be a list of whole numbers"),
    (["export", "--supernet", str(SUPERNET), "--arch", json.dumps(GOOD), "--budget-ms", "-1"],
     "--budget-ms must be a positive number"),
    (["export", "--supernet", str(SUPERNET), "--arch", json.dumps(GOOD), "--test-batches", "0"],
     "--test-batches must be >= 1"),
    (["demo", "--val-images", "0"], "--val-images must be a positive multiple of 500"),
    (["demo", "--val-images", "700"], "--val-images must be a positive multiple of 500"),
    (["train", "--space", "mbv3-32", "--epochs", "1", "--train-subset", "100000000"], "--train-subset must lie in"),
])
def test_a_silent_wrong_answer_is_now_one_line(hwnas_cli: Any, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = hwnas_cli(*args, "--out", str(out))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()
