"""Differentiable search under a hard latency budget: exact expected latency, a repaired argmax that fills the band.

Two spaces are defined here and solved by brute force:
- `PAIR` (2 stages, 800 archs): the expected latency of a distribution is summed over every arch,
  weighted by its probability, and compared with the closed form, for every calibration kind;
- `TRIO` (3 stages, 16000 archs): the search itself, on an accuracy that is additive over the
  choices (each choice's latency plus a fixed per-choice term), so the constrained optimum is known.
A supernet over `PAIR` on random images checks batch rewards and joint fine-tuning; `hwnas search
--strategy differentiable` runs end to end on the supernet `test_search_cli` trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import test_search_cli as cli
import torch
from test_search import every_arch, synthetic_table  # the synthetic table and enumeration both suites search

from hwnas.errors import BudgetError, HwnasError
from hwnas.latency.table import LatencyTable
from hwnas.search import STRATEGIES, FunctionEvaluator, get_strategy
from hwnas.search.differentiable import ArchDistribution, ExpectedLatency, differentiable_search
from hwnas.space import Arch, SearchSpace, StageSpec


def make_space(name: str, stages: int) -> SearchSpace:
    return SearchSpace(
        name=name, in_channels=1, num_classes=4, stem_channels=8, stem_stride=2, stem_act="hswish", first_channels=8,
        stages=tuple(StageSpec(16 + 8 * i, stride=2 if i == 0 else 1, act="hswish", se=i == 1) for i in range(stages)),
        final_expand_channels=32, feature_channels=48, head_act="hswish",
        kernel_choices=(3, 5), expand_choices=(2, 4), depth_choices=(1, 2), resolution_choices=(12, 16))


PAIR = make_space("pair", 2)
TRIO = make_space("trio", 3)


def calibrated(space: SearchSpace, kind: str) -> LatencyTable:
    """A table whose calibration of `kind` was fitted to 'measured' subnets that run slower than their block sum."""
    table = synthetic_table(space)
    rng = np.random.default_rng(7)
    archs = [space.sample(rng) for _ in range(24)]
    measured = [(a, 1.2 * table.predict_raw(a) + 0.03 * sum(a.depths) + 0.25 + rng.normal(0, 0.01)) for a in archs]
    calibration = table.fit_calibration(measured, kind=kind)
    assert calibration["kind"] == kind
    return table


def random_logits(dist: ArchDistribution, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logits in dist.parameters():
            logits.copy_(torch.randn(logits.shape, generator=generator, dtype=logits.dtype) * 1.5)


class PlainLatency:
    """Only `predict`: no block costs, so the expected latency can only be estimated."""

    def __init__(self, table: LatencyTable) -> None:
        self.table = table

    def predict(self, arch: Arch) -> float:
        return self.table.predict(arch)


class CurvedLatency(PlainLatency):
    """Has `block_cost` but predicts a power of the sum: not affine, so no exact expectation."""

    def block_cost(self, spec: Any) -> float:
        return self.table.block_cost(spec)

    def predict(self, arch: Arch) -> float:
        return self.table.predict(arch) ** 1.3


# ---- the expected latency is exact ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_archs() -> list[Arch]:
    archs = every_arch(PAIR)
    assert len(archs) == PAIR.size() == 800
    return archs


@pytest.mark.parametrize("kind", ["none", "scale", "linear", "linear+blocks", "per-kind"])
def test_expected_latency_equals_the_brute_force_expectation(kind: str, pair_archs: list[Arch]) -> None:
    table = synthetic_table(PAIR) if kind == "none" else calibrated(PAIR, kind)
    lat = torch.as_tensor(table.predict_many(pair_archs), dtype=torch.float64)
    expectation = ExpectedLatency(PAIR, table)
    assert expectation.is_exact
    dist = ArchDistribution(PAIR)
    genes = dist.codec.genes(pair_archs, np.random.default_rng(0))
    for seed in range(3):
        random_logits(dist, seed)
        probs = dist.log_prob(genes).exp()  # P(arch), active choices only: the archs are all distinct networks
        brute = (probs * lat).sum()
        exact = expectation.exact(dist)
        assert float(probs.sum().detach()) == pytest.approx(1.0, abs=1e-12)
        assert float(exact.detach()) == pytest.approx(float(brute.detach()), rel=1e-12)
        # and the gradient in the logits is the brute-force one
        grads = torch.autograd.grad(exact, dist.parameters())
        brute_grads = torch.autograd.grad(brute, dist.parameters())
        for g, b in zip(grads, brute_grads, strict=True):
            assert torch.allclose(g, b, rtol=1e-9, atol=1e-12)
        assert dist.probability(pair_archs[5]) == pytest.approx(float(probs[5].detach()), rel=1e-12)
        # entropy of the distribution over distinct networks, by brute force
        entropy = float(-(probs * probs.log()).sum().detach())
        assert float(dist.entropy().detach()) == pytest.approx(entropy, rel=1e-10)


def test_a_model_without_block_costs_gets_a_monte_carlo_estimate(pair_archs: list[Arch]) -> None:
    table = synthetic_table(PAIR)
    dist = ArchDistribution(PAIR)
    random_logits(dist, 1)
    exact = float(ExpectedLatency(PAIR, table).exact(dist).detach())
    estimate = ExpectedLatency(PAIR, PlainLatency(table), mc_samples=4000)
    assert not estimate.is_exact
    value, surrogate = estimate.estimate(dist, np.random.default_rng(0))
    assert value == pytest.approx(exact, rel=0.02) and float(surrogate.detach()) == pytest.approx(value)
    surrogate.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dist.parameters())
    with pytest.raises(HwnasError, match="not affine"):
        ExpectedLatency(PAIR, CurvedLatency(table))


# ---- the search ----------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    space: SearchSpace
    table: LatencyTable
    archs: list[Arch]
    lat: np.ndarray
    acc: np.ndarray

    def __post_init__(self) -> None:
        self.index = {a: i for i, a in enumerate(self.archs)}

    def evaluator(self) -> FunctionEvaluator:
        return FunctionEvaluator(lambda arch: float(self.acc[self.index[arch]]))

    def budget(self, quantile: float) -> float:
        return float(np.quantile(self.lat, quantile))

    def rank(self, arch: Arch, budget: float) -> float:
        """Share of the archs within `budget` that are more accurate than `arch` (0: the constrained optimum)."""
        feasible = self.acc[self.lat <= budget]
        return float((feasible > self.acc[self.index[arch]]).mean())


@pytest.fixture(scope="module")
def trio() -> Problem:
    table = synthetic_table(TRIO)
    archs = every_arch(TRIO)
    lat = table.predict_many(archs)
    features = np.stack([TRIO.encode(a) for a in archs])
    # additive over the choices: what a block costs, and a fixed term per choice
    acc = 50 + 25 * lat / lat.max() + features @ np.random.default_rng(3).normal(0, 0.2, TRIO.encoding_size)
    return Problem(TRIO, table, archs, lat, acc)


def test_the_derived_arch_is_within_the_budget_and_fills_the_band(trio: Problem) -> None:
    ranks = []
    for quantile in (0.02, 0.1, 0.3, 0.6, 0.9):
        budget = trio.budget(quantile)
        evaluator = trio.evaluator()
        result = differentiable_search(trio.space, evaluator, trio.table, budget, queries=120, seed=0, costs=False)
        latency = trio.table.predict(result.best)
        derived = trio.table.predict(Arch.from_json(result.info["derived_arch"]))
        assert 0.97 * budget <= derived <= budget, (quantile, derived / budget, result.info["repair"])
        assert result.info["derived_in_band"] and result.info["latency_expectation"] == "exact"
        within = result.candidates[result.candidates["latency_ms"] <= budget]
        assert latency <= budget and result.best_row["accuracy"] == within["accuracy"].max(), "the best it evaluated"
        assert result.best_row["arch_id"] == result.best.arch_id and result.best_row["latency_ms"] == latency
        assert result.best_row["accuracy"] == pytest.approx(trio.acc[trio.index[result.best]])
        assert evaluator.calls == result.queries <= 120 and len(result.candidates) == result.queries
        assert result.strategy == "differentiable" and result.budget_ms == budget
        ranks.append(trio.rank(result.best, budget))
    # toward the known constrained optimum: in the better half of the subnets within every budget and
    # the best 10 % on average (a pick at random in the band ranks 0.5). Measured with seed 0: ranks
    # 0.26, 0.001, 0.013, 0.004, 0.0; random search with the same 120 queries does better at the tightest
    # budget (0.003), which the closing note of the issue reports rather than this test hiding.
    assert max(ranks) < 0.5 and np.mean(ranks) < 0.1, ranks


def test_a_budget_over_every_subnet_returns_the_largest_and_one_at_the_fastest_the_fastest(trio: Problem) -> None:
    low, high = trio.table.latency_range(trio.space)
    top = differentiable_search(trio.space, trio.evaluator(), trio.table, high * 1.5, queries=20, seed=1, costs=False)
    assert trio.table.predict(top.best) == pytest.approx(high) and not top.info["in_band"]
    bottom = differentiable_search(trio.space, trio.evaluator(), trio.table, low, queries=20, seed=1, costs=False)
    assert trio.table.predict(bottom.best) <= low


def test_a_budget_below_the_fastest_subnet_is_an_error_with_the_feasible_range(trio: Problem) -> None:
    low, high = trio.table.latency_range(trio.space)
    evaluator = trio.evaluator()
    with pytest.raises(BudgetError) as info:
        differentiable_search(trio.space, evaluator, trio.table, 0.9 * low, queries=50)
    message = str(info.value)
    assert "\n" not in message and f"{low:.4g}-{high:.4g} ms" in message and "exact" in message
    assert f"{0.9 * low:.4g} ms" in message and evaluator.calls == 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(BudgetError, match="positive"):
            differentiable_search(trio.space, evaluator, trio.table, bad, queries=10)


def test_history_logs_the_distribution_per_step_and_the_report_writes_it(trio: Problem, tmp_path: Path) -> None:
    from hwnas.report import write_report

    budget = trio.budget(0.3)
    result = differentiable_search(trio.space, trio.evaluator(), trio.table, budget, queries=60, seed=2, costs=False)
    history = result.history
    assert {"generation", "queries", "expected_latency_ms", "argmax_latency_ms", "multiplier", "entropy", "loss",
            "mean_accuracy"} <= set(history.columns)
    assert history["generation"].tolist() == list(range(len(history))) == list(range(result.info["steps"]))
    assert (history["multiplier"] >= 0).all() and history["multiplier"].iloc[0] == 0
    uniform = float(ExpectedLatency(trio.space, trio.table).exact(ArchDistribution(trio.space)).detach())
    assert history["expected_latency_ms"].iloc[0] == pytest.approx(uniform)  # the first step starts uniform
    assert history["entropy"].iloc[-1] < history["entropy"].iloc[0]
    assert history["queries"].is_monotonic_increasing
    files = write_report(result, tmp_path)
    written = pd.read_csv(files["history.csv"])
    assert list(written.columns) == list(history.columns) and len(written) == len(history)
    assert Arch.from_file(files["best.json"]) == result.best
    assert "multiplier" in files["summary.md"].read_text()


def test_seeds_lean_the_start_and_repair_leaves_an_arch_in_the_band_alone(trio: Problem) -> None:
    budget = trio.budget(0.4)
    feasible = np.flatnonzero(trio.lat <= budget)
    best = trio.archs[int(feasible[np.argmax(trio.acc[feasible])])]
    assert trio.table.predict(best) >= 0.97 * budget  # the optimum sits at the budget
    result = differentiable_search(trio.space, trio.evaluator(), trio.table, budget, queries=5, steps=0,
                                   seed_population=[best], costs=False)
    assert result.best == best and result.info["repair"] == [] and result.info["seeded"] == 1


def test_a_latency_model_with_predict_only_is_searched_by_monte_carlo(trio: Problem) -> None:
    budget = trio.budget(0.3)
    model = PlainLatency(trio.table)
    result = differentiable_search(trio.space, trio.evaluator(), model, budget, queries=40, mc_samples=16, seed=0,
                                   costs=False)
    assert result.info["latency_expectation"].startswith("monte-carlo")
    assert 0.97 * budget <= model.predict(result.best) <= budget


def test_same_seed_same_search(trio: Problem) -> None:
    def run(seed: int) -> list[str]:
        return differentiable_search(trio.space, trio.evaluator(), trio.table, trio.budget(0.4), queries=30,
                                     seed=seed, costs=False).candidates["arch_id"].tolist()

    assert run(3) == run(3) and run(3) != run(4)


def test_registered_by_name_and_refuses_what_it_cannot_search(trio: Problem) -> None:
    from test_search import ToyAccuracy, ToySpace, ToyTable

    assert get_strategy("differentiable") is STRATEGIES["differentiable"]
    space = ToySpace()
    table = ToyTable(space)
    with pytest.raises(HwnasError, match="needs a space with a gene codec"):  # ToySpace offers none
        STRATEGIES["differentiable"](space, ToyAccuracy(table), table, table.latency_range(space)[1], queries=10)
    budget = trio.budget(0.5)
    with pytest.raises(HwnasError, match="SupernetEvaluator"):
        differentiable_search(trio.space, trio.evaluator(), trio.table, budget, reward="batch")
    with pytest.raises(HwnasError, match="finetune"):
        differentiable_search(trio.space, trio.evaluator(), trio.table, budget, finetune=True, reward="evaluator")


# ---- on a supernet: batch rewards, joint fine-tuning ------------------------------------------------------------
@pytest.fixture(scope="module")
def supernet_setup() -> tuple[Any, Any, LatencyTable]:
    from hwnas.data import TensorSplit
    from hwnas.search.evaluate import SupernetEvaluator
    from hwnas.supernet import Supernet

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        images = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=generator)
        return TensorSplit(images, torch.randint(0, 4, (n,), generator=generator), mean=(0.5,), std=(0.25,))

    net = Supernet(PAIR)
    evaluator = SupernetEvaluator(net, split(64), split(64), batch_size=32, max_batches=1, bn_batches=1,
                                  bn_batch_size=16)
    return net, evaluator, synthetic_table(PAIR)


def test_batch_rewards_leave_the_supernet_as_it_was(supernet_setup: tuple[Any, Any, LatencyTable]) -> None:
    net, evaluator, table = supernet_setup
    before = {k: v.clone() for k, v in net.state_dict().items()}
    budget = float(np.quantile(table.predict_many(every_arch(PAIR)), 0.5))
    result = differentiable_search(PAIR, evaluator, table, budget, reward="batch", steps=4, samples_per_step=2,
                                   batch_size=16, seed=0, costs=False)
    assert result.supernet_state is None and result.info["reward"] == "batch"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN buffers included
    assert table.predict(result.best) <= budget and result.queries == 1
    assert result.best_row["accuracy"] == evaluator.evaluate(result.best)
    assert len(result.history) == 4 and result.history["task_loss"].notna().all()


def test_joint_fine_tuning_returns_weights_the_derived_arch_is_scored_with(
        supernet_setup: tuple[Any, Any, LatencyTable]) -> None:
    from hwnas.search.evaluate import SupernetEvaluator
    from hwnas.supernet import Supernet

    net, evaluator, table = supernet_setup
    before = {k: v.clone() for k, v in net.state_dict().items()}
    budget = float(np.quantile(table.predict_many(every_arch(PAIR)), 0.5))
    result = differentiable_search(PAIR, evaluator, table, budget, finetune=True, steps=3, samples_per_step=2,
                                   batch_size=16, weight_lr=0.05, seed=0, costs=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a copy was trained
    state = result.supernet_state
    assert state is not None and state.keys() == before.keys()
    assert any(not torch.equal(state[k], before[k]) for k in before)
    tuned = Supernet(PAIR)
    tuned.load_state_dict(state)
    again = SupernetEvaluator(tuned, evaluator.split, evaluator.calibration, batch_size=32, max_batches=1,
                              bn_batches=1, bn_batch_size=16)
    assert result.best_row["accuracy"] == again.evaluate(result.best)
    assert table.predict(result.best) <= budget and result.info["finetune"]


# ---- the command line ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_cli_setup(tmp_path_factory: pytest.TempPathFactory) -> cli.Setup:
    """test_search_cli's fixture (a briefly trained supernet and its table), built for this module."""
    return cli.setup.__wrapped__(tmp_path_factory)


def test_cli_search_differentiable_end_to_end(search_cli_setup: cli.Setup, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    setup = search_cli_setup
    from hwnas.checkpoint import load_supernet

    table = LatencyTable.load(setup.table)
    budget = setup.low + 0.4 * (setup.high - setup.low)
    out = tmp_path / "dnas"
    code, printed, err = cli.run_cli(setup.args(budget, out, "--strategy", "differentiable"), capsys)
    assert code == 0, err
    best = json.loads((out / "best.json").read_text())
    arch = Arch.from_file(out / "best.json")
    assert best["strategy"] == "differentiable" and 0.97 * budget <= table.predict(arch) <= budget
    assert best["supernet_evaluations"] <= 8
    history = pd.read_csv(out / "history.csv")
    assert {"expected_latency_ms", "multiplier", "entropy", "loss"} <= set(history.columns)
    assert not (out / "supernet.pt").exists()

    tuned = tmp_path / "dnas-tuned"
    code, printed, err = cli.run_cli(setup.args(budget, tuned, "--strategy", "differentiable", "--finetune",
                                                "--steps", "2"), capsys)
    assert code == 0, err
    net, state = load_supernet(tuned / "supernet.pt")  # what 'hwnas export --supernet' reads
    arch = Arch.from_file(tuned / "best.json")
    assert state["finetuned_from"] == str(setup.supernet) and table.predict(arch) <= budget
    assert net.extract(arch) is not None and str(tuned / "supernet.pt") in printed
    recorded = json.loads((tuned / "best.json").read_text())["finetuned_supernet"]  # relative to best.json
    assert not Path(recorded).is_absolute() and (tuned / recorded).resolve() == (tuned / "supernet.pt").resolve()

    # 'hwnas export' of the folder takes the fine-tuned weights by itself (the arch was chosen with them)
    code, _, err = cli.run_cli(["export", "--arch", str(tuned), "--data", "none", "--out", str(tmp_path / "exp")],
                               capsys)
    assert code == 0, err
    import onnx

    props = {p.key: p.value for p in onnx.load(str(next((tmp_path / "exp").glob("*.onnx")))).metadata_props}
    assert (tmp_path / "exp" / props["hwnas.source"]).resolve() == (tuned / "supernet.pt").resolve()

    code, _, err = cli.run_cli(setup.args(budget, tmp_path / "x", "--finetune"), capsys)
    assert code == 2 and "--finetune applies to --strategy differentiable only" in cli.one_line(err)
