"""Fixtures several test modules share."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def this_cpu_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tables holding mbv3-32 on this CPU with `cpu-onnxruntime`, made once per test session.

    The committed table when its fingerprint matches this machine (copied, so tests may resume or
    rewrite it), else the space profiled here with one timing round instead of three: tests that
    need a table of this device (the README's Python walk-through) need it to exist, not to be
    precise, and profiling the space costs half a minute of the suite's eight.
    """
    from hwnas import spaces
    from hwnas.latency.catalog import find_table
    from hwnas.latency.profiler import calibration_path, profile_space, table_path
    from hwnas.latency.profiles import load_profile
    from hwnas.latency.table import meta_path_for

    root = tmp_path_factory.mktemp("this_cpu_tables")
    space, profile = spaces.get("mbv3-32"), load_profile("cpu-onnxruntime")
    committed, _ = find_table(space, profile)
    if committed is not None and committed.path is not None and calibration_path(committed.path).is_file():
        target = table_path(root, space, profile, committed.device_slug)
        target.parent.mkdir(parents=True)
        for source in (committed.path, meta_path_for(committed.path), calibration_path(committed.path)):
            shutil.copy(source, target.parent / source.name)
    else:
        profile_space(space, profile, root, rounds=1, progress=False)
    return root


class CliResult:
    """What one `hwnas` command left: its exit code and what it printed."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture()
def hwnas_cli(capsys: pytest.CaptureFixture):  # noqa: ANN201 - a function returned by a fixture
    """Run `hwnas ARGS` in this process (the same `main` the console script calls, without a second torch import):
    an exception that is not an `HwnasError` escapes it, so a traceback a user would see fails the test."""
    from hwnas.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse refused an option: its one line is on stderr
            code = exc.code if isinstance(exc.code, int) else 2
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
