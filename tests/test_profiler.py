"""The profiler on real CPU backends (eager torch, ONNX Runtime): resume after a kill, refusal, the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from hwnas import spaces
from hwnas.cli import main as hwnas_main
from hwnas.errors import LatencyTableError
from hwnas.latency.profiler import CHUNK, calibration_path, profile_space
from hwnas.latency.table import LatencyTable, meta_path_for
from hwnas.space import SearchSpace, StageSpec

PROFILE_TOML = """\
name = "test-cpu"
backend = "{backend}"
precision = "fp32"
batch_size = 1
threads = 1
warmup = 1
repeats = 5
statistic = "median"
description = "fast settings for tests: numbers are noisy"
"""


def tiny_space(name: str = "tiny-prof") -> SearchSpace:
    """A 1-2 stage space of 8-16 px: about 30 blocks, a second or two to profile."""
    return SearchSpace(
        name=name, in_channels=3, num_classes=4, stem_channels=8, stem_stride=2, stem_act="hswish",
        first_channels=8,
        stages=(StageSpec(16, stride=2, act="relu"), StageSpec(24, stride=1, act="hswish", se=True)),
        final_expand_channels=32, feature_channels=48, head_act="hswish",
        kernel_choices=(3, 5), expand_choices=(2, 4), depth_choices=(1, 2), resolution_choices=(12, 16),
    )


@pytest.fixture()
def profile_file(tmp_path: Path) -> Path:
    """Eager torch on the CPU: real timings without an export step, so the tests stay fast."""
    path = tmp_path / "test-cpu.toml"
    path.write_text(PROFILE_TOML.format(backend="torch-cpu"))
    return path


def _rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).set_index("key")


def test_resume_after_kill_keeps_finished_rows_and_measures_only_the_rest(tmp_path, profile_file) -> None:
    space = tiny_space()
    out = tmp_path / "tables"
    # A separate process profiles and is SIGKILLed by its own hook once the first chunk is on disk.
    script = textwrap.dedent(f"""
        import json, os, signal
        from hwnas.space import SearchSpace
        from hwnas.latency.profiler import profile_space
        space = SearchSpace.from_dict(json.loads({json.dumps(json.dumps(space.to_dict()))}))
        def on_row(spec, timing):
            os.kill(os.getpid(), signal.SIGKILL)
        profile_space(space, {str(profile_file)!r}, {str(out)!r}, calibration_subnets=3, rounds=1,
                      progress=False, on_row=on_row)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (path,) = (out / space.name).glob("*.csv")
    before = _rows(path)
    assert len(before) == CHUNK  # the chunk written before the kill, nothing half-written
    assert not list(path.parent.glob(".*tmp"))

    measured: list[str] = []
    again = profile_space(space, profile_file, out, calibration_subnets=3, rounds=1, progress=False,
                          on_row=lambda spec, timing: measured.append(spec.key))
    assert again == path
    after = _rows(path)
    all_keys = {spec.key for spec in space.all_blocks()}
    assert set(after.index) == all_keys
    assert set(measured) == all_keys - set(before.index)  # finished rows are not measured again
    pd.testing.assert_frame_equal(after.loc[before.index], before)  # and are kept exactly
    table = LatencyTable.load(path)
    assert table.meta["profiling"]["measured_last_run"] == len(all_keys) - CHUNK
    assert table.calibration["n_subnets"] == 3


def test_resumed_calibration_measures_only_new_subnets(tmp_path, profile_file) -> None:
    space = tiny_space()
    path = profile_space(space, profile_file, tmp_path, calibration_subnets=3, rounds=1, progress=False)
    first = pd.read_csv(calibration_path(path))
    assert len(first) == 3
    profile_space(space, profile_file, tmp_path, calibration_subnets=5, rounds=1, progress=False)
    second = pd.read_csv(calibration_path(path))
    assert len(second) == 5
    pd.testing.assert_frame_equal(second.iloc[:3], first)  # the three measured subnets are kept as they were
    table = LatencyTable.load(path)
    assert table.calibration["n_subnets"] == 5
    assert table.calibration["arch_ids"] == list(second["arch_id"])


def test_resume_into_a_table_of_another_device_is_refused(tmp_path, profile_file) -> None:
    space = tiny_space()
    path = profile_space(space, profile_file, tmp_path, calibration_subnets=0, rounds=1, progress=False)
    meta_path = meta_path_for(path)
    meta = json.loads(meta_path.read_text())
    field = _identity_field(meta["fingerprint"])
    meta["fingerprint"][field] = "Another Device 1234"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LatencyTableError, match=r"cannot resume.*Another Device 1234.*--no-resume"):
        profile_space(space, profile_file, tmp_path, calibration_subnets=0, rounds=1, progress=False)
    profile_space(space, profile_file, tmp_path, resume=False, calibration_subnets=0, rounds=1, progress=False)
    assert "Another Device 1234" not in meta_path.read_text()


def _identity_field(fp: dict) -> str:
    """A fingerprint field whose change makes another device (the CPU model on a CPU)."""
    from hwnas.latency.device import fingerprint_differences

    for name, value in fp.items():
        if isinstance(value, str):
            changed = dict(fp, **{name: "Another Device 1234"})
            if fingerprint_differences(fp, changed)[0]:
                return name
    raise AssertionError(f"no identity field in {sorted(fp)}")


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime-cpu"])
def test_cli_profile_then_validate_writes_table_and_report(tmp_path, backend, capsys) -> None:
    if backend == "onnxruntime-cpu":
        pytest.importorskip("exporters.onnx", reason="the onnxruntime-cpu backend exports through exporters.onnx")
    profile_file = tmp_path / "test-cpu.toml"
    profile_file.write_text(PROFILE_TOML.format(backend=backend))
    spaces.register("tiny-cli", lambda **_: tiny_space("tiny-cli"))
    out = tmp_path / "tables"
    assert hwnas_main(["profile", "--profile", str(profile_file), "--space", "tiny-cli", "--out", str(out),
                       "--calibration-subnets", "4", "--rounds", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    (path,) = (out / "tiny-cli").glob("*__test-cpu.csv")
    assert f"wrote {path}" in printed and "predicted latency range" in printed
    table = LatencyTable.load(path)
    assert table.missing_keys(tiny_space("tiny-cli")) == []

    report_dir = tmp_path / "val"
    assert hwnas_main(["latency", "validate", "--table", str(path), "--n", "5", "--out", str(report_dir),
                       "--rounds", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "within +-5 %" in printed and "Kendall tau" in printed and str(report_dir / "validation.png") in printed
    rows = pd.read_csv(report_dir / "validation.csv")
    assert len(rows) == 5 and {"arch", "arch_id", "flops", "predicted", "measured", "p10", "p90"} <= set(rows)
    figures = json.loads((report_dir / "validation.json").read_text())
    assert figures["n"] == 5 and 0 <= figures["lut"]["within_5pct"] <= 1
    assert (report_dir / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_bad_profile_in_one_line(tmp_path, capsys) -> None:
    assert hwnas_main(["profile", "--profile", str(tmp_path / "nope.toml"), "--space", "mbv3-32",
                       "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.toml" in err and "\n" not in err
