"""A search killed mid-run and resumed takes the same trajectory as one that was never interrupted.

The journal keeps every evaluation a search paid for; `--resume` replays them. Checked twice: with
a real SIGKILL of `hwnas search` on the shipped supernet (identical candidates.csv), and through the
library for every strategy, interrupted by an evaluator that stops after a few archs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_search import TINY, Problem, tiny_problem
from test_search_cli import small_fashion_mnist

from hwnas import spaces
from hwnas.errors import HwnasError
from hwnas.search import STRATEGIES
from hwnas.search.journal import JOURNAL_NAME, EvaluationJournal

SEARCH = ["--queries", "24", "--population", "6", "--val-size", "200", "--val-batches", "1", "--batch-size", "100",
          "--bn-batches", "1", "--bn-batch-size", "64", "--device", "cpu", "--quiet", "--seed", "3"]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_search import synthetic_table

    from hwnas.demo import shipped_supernet

    root = tmp_path_factory.mktemp("resume")
    table = synthetic_table(spaces.get("mbv3-32")).save(root / "tables" / "mbv3-32" / "synthetic__test.csv")
    return {"root": root, "table": table, "supernet": shipped_supernet(),
            "data": small_fashion_mnist(root / "fmnist")}


def _search(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    from hwnas.latency.table import LatencyTable

    low, high = LatencyTable.load(setup["table"]).latency_range(spaces.get("mbv3-32"))
    return ["search", "--supernet", str(setup["supernet"]), "--table", str(setup["table"]), "--budget-ms",
            f"{low + 0.5 * (high - low):.4f}", "--data", f"fashion-mnist:{setup['data']}", "--out", str(out), *SEARCH,
            *extra]


def _evaluations(journal: Path) -> int:
    try:
        return len(json.loads(journal.read_text())["evaluations"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_search_killed_by_sigkill_resumes_to_the_same_candidates(cli_setup: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from hwnas.cli import main

    whole = tmp_path / "whole"
    assert main(_search(cli_setup, whole)) == 0

    killed = tmp_path / "killed"  # the one run that must be a real process, to be killed for real
    proc = subprocess.Popen([sys.executable, "-m", "hwnas.cli", *_search(cli_setup, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = killed / JOURNAL_NAME
    deadline = time.monotonic() + 300
    while _evaluations(journal) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    paid = _evaluations(journal)
    assert 8 <= paid < 24 and not (killed / "best.json").exists(), "killed mid-run, with part of the search journaled"

    capsys.readouterr()
    assert main(_search(cli_setup, killed)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_search(cli_setup, killed, "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"resuming: {paid} evaluations of the interrupted search are replayed" in printed
    assert (killed / "candidates.csv").read_text() == (whole / "candidates.csv").read_text()
    best, reference = (json.loads((d / "best.json").read_text()) for d in (killed, whole))
    assert best["arch_id"] == reference["arch_id"] and best["supernet_evaluations"] == 24
    assert best["resumed"]["replayed_evaluations"] == paid

    assert main(_search(cli_setup, killed, "--resume", "--queries", "25")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "queries was 24, now 25" in lines[0], lines


@pytest.fixture(scope="module")
def tiny() -> Problem:
    return tiny_problem()


class StopAfter:
    """An evaluator that raises after `n` evaluations: a kill, as far as the search can tell."""

    def __init__(self, evaluator: Any, n: int) -> None:
        self.evaluator, self.left = evaluator, n

    def evaluate(self, arch: Any) -> float:
        if self.left <= 0:
            raise KeyboardInterrupt
        self.left -= 1
        return float(self.evaluator.evaluate(arch))


@pytest.mark.parametrize("strategy", ["evolution", "nsga", "random", "differentiable"])
def test_every_strategy_resumed_from_its_journal_repeats_the_uninterrupted_run(strategy: str, tiny: Problem,
                                                                               tmp_path: Path) -> None:
    budget = tiny.budget(0.4)
    options: dict[str, Any] = {"queries": 60, "seed": 5, "costs": False}
    if strategy in ("evolution", "nsga"):
        options["population_size"] = 10

    def search(evaluator: Any) -> Any:
        return STRATEGIES[strategy](tiny.space, evaluator, tiny.latency, budget, **options)

    reference = search(tiny.accuracy)
    identity = {"strategy": strategy, **options}
    path = tmp_path / JOURNAL_NAME
    with pytest.raises(KeyboardInterrupt):
        search(EvaluationJournal(path, identity).wrap(StopAfter(tiny.accuracy, 23)))
    journal = EvaluationJournal(path, identity, resume=True)
    assert journal.known_at_start == 23
    calls = tiny.accuracy.calls
    resumed = search(journal.wrap(tiny.accuracy))
    assert tiny.accuracy.calls - calls == len(reference.candidates) - 23, "only the rest is evaluated again"
    pd.testing.assert_frame_equal(resumed.candidates, reference.candidates)
    assert resumed.best_row is not None and resumed.best_row["arch_id"] == reference.best_row["arch_id"]
    assert journal.replayed == 23


def test_a_journal_of_other_settings_or_a_damaged_one_is_refused_naming_why(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    journal = EvaluationJournal(path, {"seed": 0, "queries": 10})
    journal.wrap(_Constant()).evaluate_many([TINY.smallest()])
    with pytest.raises(HwnasError, match=r"other settings \(seed; seed was 0, now 1\)"):
        EvaluationJournal(path, {"seed": 1, "queries": 10}, resume=True)
    assert EvaluationJournal(path, {"seed": 0, "queries": 10}, resume=True).known_at_start == 1
    path.write_text('{"format": "hwnas-search-journal", "version": 1, "identity": {"seed": 0, "queries": 10}, '
                    '"evaluations": [["a", "high"]]}')
    with pytest.raises(HwnasError, match="'evaluations' must be a list of"):
        EvaluationJournal(path, {"seed": 0, "queries": 10}, resume=True)
    path.write_text("{not json")
    with pytest.raises(HwnasError, match="not a readable search journal"):
        EvaluationJournal(path, {"seed": 0, "queries": 10}, resume=True)


class _Constant:
    def evaluate(self, arch: Any) -> float:
        return float(np.float64(50.0))
