"""Fixtures several test modules share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def this_cpu_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of tables holding mbv3-32 profiled on this CPU with `cpu-onnxruntime`, once per test session.

    One timing round instead of three: tests that need a table matching this machine's fingerprint
    (the demo, the README's Python walk-through) need it to exist, not to be precise, and profiling
    the space costs half a minute of the suite's ten.
    """
    from hwnas import spaces
    from hwnas.latency.profiler import profile_space

    root = tmp_path_factory.mktemp("this_cpu_tables")
    profile_space(spaces.get("mbv3-32"), "cpu-onnxruntime", root, rounds=1, progress=False)
    return root
