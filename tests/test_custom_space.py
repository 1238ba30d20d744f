"""A space from outside the presets (`hwnas.examples.cell_space`), searched by every strategy through the protocols:
from Python and from `hwnas search --space package.module:factory`; and the searchers' behaviour at hard budgets
(the tightest, an isolated optimum, a latency model that only predicts) on spaces whose optimum is known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from hwnas import spaces
from hwnas.errors import HwnasError
from hwnas.examples import cell_space
from hwnas.latency.table import LatencyTable
from hwnas.search import STRATEGIES, check_budget
from hwnas.search.predictor import AccuracyPredictor

ROOT = Path(__file__).resolve().parents[1]
MBV3_32_TABLE = ROOT / "latency_tables" / "mbv3-32" / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv"
CELL = "hwnas.examples.cell_space"


class PredictOnly:
    """A latency model that only predicts: no `block_cost`, no `latency_range` (a user's own predictor)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict(self, arch: Any) -> float:
        return float(self.model.predict(arch))


@pytest.fixture(scope="module")
def cell() -> tuple[Any, Any, Any, list[Any], np.ndarray, np.ndarray]:
    space, latency, accuracy = cell_space.space(), cell_space.latency(), cell_space.evaluator()
    archs = space.all_archs()
    lat = latency.predict_many(archs)
    acc = np.array([accuracy.evaluate(a) for a in archs])
    return space, latency, accuracy, archs, lat, acc


def best_evaluated(result: Any, budget: float) -> float:
    within = result.candidates[result.candidates["latency_ms"] <= budget]
    return float(within["accuracy"].max())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_searcher_runs_on_the_example_space_within_the_budget(cell: tuple, strategy: str) -> None:
    space, latency, accuracy, _, lat, _ = cell
    budget = float(np.quantile(lat, 0.3))
    result = STRATEGIES[strategy](space, cell_space.evaluator(), latency, budget, queries=120, seed=0, costs=False)
    assert result.best is not None and latency.predict(result.best) <= budget
    assert result.best_row["accuracy"] == best_evaluated(result, budget), "the best in-budget arch it evaluated"


@pytest.mark.parametrize("model", ["additive", "predict-only"])
def test_the_differentiable_search_returns_the_best_in_budget_arch_it_evaluated(cell: tuple, model: str) -> None:
    space, latency, _, archs, lat, acc = cell
    latency_model = latency if model == "additive" else PredictOnly(latency)
    for quantile in (0.02, 0.2, 0.5):
        budget = float(np.quantile(lat, quantile))
        result = STRATEGIES["differentiable"](space, cell_space.evaluator(), latency_model, budget, queries=80,
                                              mc_samples=16, seed=1, costs=False)
        assert latency.predict(result.best) <= budget, (model, quantile)
        assert result.best_row["accuracy"] == best_evaluated(result, budget), (model, quantile)
        assert result.info["latency_expectation"].startswith("monte-carlo"), "no hwnas gene codec: estimated"
        optimum = float(acc[lat <= budget].max())
        assert result.best_row["accuracy"] <= optimum + 1e-9


def test_the_differentiable_search_runs_on_mbv3_32_with_a_predictor_and_a_predict_only_model() -> None:
    space = spaces.get("mbv3-32")
    table = LatencyTable.load(MBV3_32_TABLE)
    rng = np.random.default_rng(0)
    pairs = [space.sample(rng) for _ in range(200)]
    truth = np.array([sum(a.depths) + 0.5 * sum(a.kernels) / len(a.kernels) + a.resolution / 8 for a in pairs])
    predictor = AccuracyPredictor(space, "ridge", seed=0)
    predictor.fit(pairs, truth)
    budget = float(np.quantile(table.predict_many(pairs), 0.4))
    for model in (table, PredictOnly(table)):
        result = STRATEGIES["differentiable"](space, predictor, model, budget, queries=60, mc_samples=16, seed=0,
                                              costs=False)
        assert table.predict(result.best) <= budget
        assert result.best_row["accuracy"] == best_evaluated(result, budget)
        expectation = result.info["latency_expectation"]
        assert expectation == "exact" if model is table else expectation.startswith("monte-carlo")


def test_nsga_held_to_a_budget_keeps_its_population_within_it(cell: tuple) -> None:
    space, latency, _, _, lat, acc = cell
    budget = float(np.quantile(lat, 0.2))
    held = STRATEGIES["nsga"](space, cell_space.evaluator(), latency, budget, queries=150, population_size=20, seed=0,
                              costs=False)
    assert (held.candidates["latency_ms"] <= budget).all(), "children over the budget are mended, not evaluated"
    free = STRATEGIES["nsga"](space, cell_space.evaluator(), latency, budget, queries=150, population_size=20, seed=0,
                              costs=False, constrained=False)
    assert (free.candidates["latency_ms"] > budget).any(), "unconstrained, the front spans every latency"
    assert latency.predict(free.best) <= budget


def test_evolution_at_the_tightest_budget_stops_once_the_feasible_archs_dry_up(cell: tuple) -> None:
    space, latency, _, _, lat, acc = cell
    low = check_budget(space, latency, float(lat.max())).low_ms
    budget = 1.02 * low
    feasible = int((lat <= budget).sum())
    result = STRATEGIES["evolution"](space, cell_space.evaluator(), latency, budget, queries=2000, population_size=30,
                                     seed=0, costs=False)
    assert latency.predict(result.best) <= budget
    assert result.queries <= feasible < 2000, (result.queries, feasible)
    assert "exhausted" in result.stop_reason
    assert result.best_row["accuracy"] >= float(acc[lat <= budget].max()) - 1e-9 or result.queries < feasible


def test_patience_and_time_limit_stop_a_search_early(cell: tuple) -> None:
    space, latency, _, _, lat, _ = cell
    budget = float(np.quantile(lat, 0.6))
    stalled = STRATEGIES["evolution"](space, cell_space.evaluator(), latency, budget, queries=5000, population_size=20,
                                      seed=0, costs=False, patience=2)
    assert stalled.stop_reason.startswith("stalled") and stalled.queries < 5000
    best = stalled.history["best_feasible_accuracy"].to_numpy()
    assert best[-1] == best[-3], "no better arch in the last 2 generations"
    timed = STRATEGIES["evolution"](space, cell_space.evaluator(), latency, budget, queries=15000, population_size=20,
                                    seed=0, costs=False, time_limit_s=1e-3)
    assert timed.stop_reason == "time limit reached" and timed.queries < 15000
    with pytest.raises(HwnasError, match="patience"):
        STRATEGIES["evolution"](space, cell_space.evaluator(), latency, budget, queries=10, patience=0)


# ---- from the command line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["evolution", "differentiable"])
def test_hwnas_search_takes_a_space_of_ones_own_from_the_command_line(hwnas_cli: Any, tmp_path: Path,
                                                                       strategy: str) -> None:
    out = tmp_path / strategy
    result = hwnas_cli("search", "--space", f"{CELL}:space", "--latency", f"{CELL}:latency", "--evaluator",
                       f"{CELL}:evaluator", "--budget-ms", "3.0", "--strategy", strategy, "--queries", "100",
                       "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    best = json.loads((out / "best.json").read_text())
    assert best["predicted_latency_ms"] <= 3.0 and best["space"] == "cell"
    candidates = pd.read_csv(out / "candidates.csv")
    within = candidates[candidates["latency_ms"] <= 3.0]
    assert best["accuracy"] == pytest.approx(within["accuracy"].max())
    arch = cell_space.Cell(tuple(cell_space.OPS.index(op) for op in best["arch"]["ops"]))
    assert arch.arch_id == best["arch_id"] and cell_space.latency().predict(arch) <= 3.0


@pytest.mark.parametrize(("args", "message"), [
    (["--space", f"{CELL}:nope"], "has no attribute 'nope'"),
    (["--space", "no_such_package.mod:space"], "no_such_package"),
    (["--space", f"{CELL}:space", "--budget-ms", "0.0001"], "no subnet of space 'cell' meets"),
    (["--space", f"{CELL}:space", "--patience", "0"], "--patience"),
    (["--space", f"{CELL}:space", "--time-limit", "-1"], "--time-limit"),
])
def test_a_bad_custom_space_is_one_line_and_nothing_written(hwnas_cli: Any, tmp_path: Path, args: list[str],
                                                             message: str) -> None:
    out = tmp_path / "out"
    base = ["--latency", f"{CELL}:latency", "--evaluator", f"{CELL}:evaluator", "--budget-ms", "3.0"]
    argv = ["search", *base, *args, "--quiet", "--out", str(out)]
    result = hwnas_cli(*argv)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_factory_spec_builds_hwnas_spaces_for_profile_and_supernet_and_refuses_others() -> None:
    from hwnas.errors import ArchError

    built = spaces.get("hwnas.spaces.mbv3_32:mbv3_32", in_channels=3, num_classes=4)
    assert built.name == "mbv3-32" and built.in_channels == 3 and built.num_classes == 4
    with pytest.raises(ArchError, match="not an hwnas.SearchSpace"):
        spaces.get(f"{CELL}:space")
    assert spaces.get_any(f"{CELL}:space").name == "cell"
