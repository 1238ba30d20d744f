"""An output path that cannot be written is one line before any work, for every command: a file where the directory
goes, a path under a file, a virtual filesystem; and an OS error in the middle of a run is one line too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hwnas.errors import OutputError
from hwnas.fileio import check_output_dir

ROOT = Path(__file__).resolve().parents[1]
SUPERNET = ROOT / "hwnas" / "checkpoints" / "mbv3-32_fashion-mnist.pt"
TABLE = ROOT / "latency_tables" / "mbv3-32" / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv"
ARCH = ('{"space": "mbv3-32", "resolution": 28, "depths": [2, 2, 2, 2], "kernels": [3, 3, 3, 3, 3, 3, 3, 3], '
        '"expands": [3, 3, 3, 3, 3, 3, 3, 3]}')
COMMANDS = {
    "search": ["search", "--supernet", str(SUPERNET), "--table", str(TABLE), "--budget-ms", "0.4", "--queries", "4",
               "--quiet"],
    "export": ["export", "--supernet", str(SUPERNET), "--arch", ARCH, "--test-batches", "1"],
    "train": ["train", "--space", "mbv3-32", "--epochs", "1"],
    "profile": ["profile", "--profile", "cpu-onnxruntime", "--space", "mbv3-32"],
    "demo": ["demo"],
}


def snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("where", ["a file", "under a file", "/proc"])
def test_an_unwritable_out_is_one_line_and_nothing_is_written(hwnas_cli: Any, tmp_path: Path, command: str,
                                                               where: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = {"a file": afile, "under a file": afile / "sub", "/proc": Path("/proc/hwnas-test-out")}[where]
    before = snapshot(tmp_path)
    result = hwnas_cli(*COMMANDS[command], "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hwnas {command}: error: --out "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert snapshot(tmp_path) == before and afile.read_text() == "keep me"


def test_the_check_creates_nothing_and_accepts_a_new_nested_directory(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_output_dir(target) == target
    assert list(tmp_path.iterdir()) == [], "nothing created, not even the probe"
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(Path(os.devnull))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory, so no refusal to see")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            check_output_dir(locked / "out")
    finally:
        locked.chmod(0o700)


def test_an_os_error_mid_run_is_one_line(hwnas_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk filling up during a search: the OS's words and the file, no traceback (a real ENOSPC raised by the
    atomic writer, as /dev/full would give)."""
    import errno

    from hwnas import fileio

    def full(path: Any) -> Any:  # every atomic write of hwnas opens through fileio.atomic_open
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fileio, "atomic_open", full)
    result = hwnas_cli(*COMMANDS["search"], "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "No space left on device" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
