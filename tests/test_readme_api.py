"""The README's Python walk-through, run as written: profile, search, export from Python in a dozen lines.

The snippet profiles this CPU into ./latency_tables; the session's table of this CPU (profiled once,
with one timing round, `conftest.this_cpu_tables`) is copied there first, so the snippet's
`profile_space` resumes it (every block and calibration subnet already measured) instead of
spending half a minute re-timing it. Everything else
runs as a user would run it: the shipped supernet, real ONNX Runtime sessions, real timings.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    text = README.read_text()
    section = text.split("## The Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has a python block"
    return match.group(1)


def test_the_python_walk_through_runs_as_written(tmp_path: Path, this_cpu_tables: Path) -> None:
    shutil.copytree(this_cpu_tables, tmp_path / "latency_tables")
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 20
    printed = io.StringIO()
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(printed):
            namespace: dict[str, object] = {}
            exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    finally:
        os.chdir(here)
    lines = printed.getvalue().splitlines()
    best = json.loads((tmp_path / "results" / "api" / "best.json").read_text())
    assert any(line.startswith(f"{best['arch_id']} {best['predicted_latency_ms']}") for line in lines), lines
    assert best["predicted_latency_ms"] <= best["budget_ms"] and best["supernet_evaluations"] == 8
    report = json.loads((tmp_path / "exports" / "api" / "deploy.json").read_text())
    assert report["arch_id"] == best["arch_id"] and (tmp_path / "exports" / "api" / report["onnx_path"]).is_file()
    assert report["measured_ms"] > 0 and report["budget_ms"] == pytest.approx(best["budget_ms"])
    assert abs(report["val_accuracy"] - best["accuracy"]) <= 0.1  # the export saw the search's BN statistics
    assert abs(report["test_accuracy_ort"] - report["test_accuracy_torch"]) <= 0.1
