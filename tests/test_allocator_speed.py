"""benchmarks/allocator_speed.py, run tiny: each allocator really runs in its child, and bad arguments are one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from _benchmarks import load_benchmark


def _benchmark() -> ModuleType:
    return load_benchmark("allocator_speed")


def test_each_installed_allocator_is_timed_in_a_child_that_has_it_loaded(tmp_path: Path) -> None:
    bench = _benchmark()
    installed = [name for name, lib in bench.find_allocators().items() if name == "glibc" or lib is not None]
    argv = ["--batch", "2", "--steps", "1", "--rounds", "1", "--threads", "1", "--out", str(tmp_path),
            "--allocators", ",".join(installed)]
    assert bench.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["allocator"] for row in summary["rows"]] == installed
    assert summary["rows"][0]["speedup_vs_glibc"] == 1.0
    for name in installed:
        (child,) = summary["runs"][name]
        assert child["loaded"] == ([] if name == "glibc" else [name])
        assert child["threads"] == 1 and len(child["seconds"]) == 1 and child["seconds"][0] > 0
    assert "| glibc |" in (tmp_path / "summary.md").read_text()


def test_a_missing_allocator_is_left_out_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _benchmark()
    monkeypatch.setattr(bench, "find_allocators", lambda: {"glibc": None, "tcmalloc": None, "jemalloc": None})
    argv = ["--batch", "2", "--steps", "1", "--rounds", "1", "--threads", "1", "--out", str(tmp_path),
            "--allocators", "glibc,jemalloc"]
    assert bench.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["allocator"] for row in summary["rows"]] == ["glibc"] and summary["missing"] == ["jemalloc"]
    assert "not installed, left out: jemalloc" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--allocators", "tcmalloc"], ["--allocators", "glibc,nope"]])
def test_bad_arguments_are_refused_in_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        _benchmark().parse_args(argv)
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --" in error and argv[0] in error
