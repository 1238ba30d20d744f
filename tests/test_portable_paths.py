"""Tables, reports and transcripts travel between machines and people: what the repository holds names files
relative to itself, never by the absolute layout of the machine that wrote it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from hwnas.fileio import recorded_path, resolve_recorded

ROOT = Path(__file__).resolve().parents[1]
# a quoted absolute path under a home, a temporary or a checkout folder, as a JSON or CSV field would hold it
MACHINE_PATH = re.compile(r"""["'](/(?:tmp|home|root|work|Users|mnt|scratch|var/folders)/[^"']*)["']""")


def tracked_text_files() -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: there is no list of tracked files")
    files = []
    for name in listing.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and path.suffix not in {".pt", ".png", ".onnx", ".npz"}:
            files.append(path)
    return files


def test_no_tracked_file_holds_the_checkouts_absolute_path() -> None:
    checkout = str(ROOT)
    holders = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if checkout in text:
            holders.append(str(path.relative_to(ROOT)))
    assert not holders, f"files naming this checkout's absolute path {checkout}: {holders}"


def test_no_committed_artifact_records_a_machine_path() -> None:
    """Tables, validation reports and benchmark summaries: no field is an absolute path of a temporary folder."""
    found = []
    for path in tracked_text_files():
        relative = path.relative_to(ROOT)
        if relative.parts[0] not in {"latency_tables", "benchmarks"} or path.suffix not in {".json", ".csv", ".md"}:
            continue
        for match in MACHINE_PATH.finditer(path.read_text(encoding="utf-8")):
            found.append(f"{relative}: {match.group(1)}")
    assert not found, found


def test_a_recorded_path_is_relative_to_its_file_and_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    table = tmp_path / "tables" / "t.csv"
    table.parent.mkdir()
    table.write_text("x")
    run = tmp_path / "results" / "run"
    run.mkdir(parents=True)
    recorded = recorded_path(table, run)
    assert recorded == "../../tables/t.csv" and not Path(recorded).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # read from another working directory: the record still finds its table
    assert resolve_recorded(recorded, run).resolve() == table.resolve()


def test_a_validation_report_names_its_table_relative_to_itself(tmp_path: Path) -> None:
    """Three subnets timed for real in ONNX Runtime: validation.json says where its table lies from its own folder."""
    from hwnas.latency.validate import validate_table

    table = ROOT / "latency_tables" / "mbv3-32" / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv"
    out = tmp_path / "reports" / "lut"
    validate_table(table, n=3, rounds=1, out_dir=out, allow_mismatch=True)
    recorded = json.loads((out / "validation.json").read_text())["table"]
    assert not Path(recorded).is_absolute()
    assert (out / recorded).resolve() == table.resolve()
