"""Search under a latency budget: the budget is hard, infeasible budgets fail fast, small spaces are solved.

Two spaces are defined here, scored from tables this file builds, with optima found by brute force:
- `ToySpace`: a space outside hwnas that implements only the searcher protocol (7 genes of 4
  choices, 16384 archs), with an additive latency table and an additive accuracy that rises with
  latency, so the budget binds and the constrained optimum is unique (checked);
- `TINY`: an `hwnas.SearchSpace` (3 stages, 16000 archs) with a `LatencyTable` of synthetic block
  timings; it runs the vectorised gene path of the searchers instead of the protocol one.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from hwnas.errors import ArchError, BudgetError, HwnasError
from hwnas.genes import GeneCodec
from hwnas.latency.backends import Timing
from hwnas.latency.table import LatencyTable
from hwnas.search import (
    STRATEGIES,
    FunctionEvaluator,
    SearchResult,
    confirm,
    evolution_search,
    get_strategy,
    hypervolume,
    nsga_search,
    random_search,
    search,
)
from hwnas.search.pareto import dominates
from hwnas.space import Arch, SearchSpace, StageSpec


# ---- a space from outside hwnas: the protocol only ----------------------------------------------------
@dataclass(frozen=True)
class ToyArch:
    genes: tuple[int, ...]
    space: str = "toy"

    @property
    def arch_id(self) -> str:
        return f"{self.space}-{''.join(map(str, self.genes))}"

    def to_json(self) -> str:
        return json.dumps({"space": self.space, "genes": list(self.genes)})


def _rng(rng: Any) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class ToySpace:
    """`n_genes` genes of `n_choices` values each; mutation resamples genes, crossover is uniform."""

    def __init__(self, n_genes: int = 7, n_choices: int = 4, name: str = "toy") -> None:
        self.name, self.n_genes, self.n_choices = name, n_genes, n_choices

    @property
    def encoding_size(self) -> int:
        return self.n_genes * self.n_choices

    def sample(self, rng: Any = None) -> ToyArch:
        return ToyArch(tuple(int(v) for v in _rng(rng).integers(self.n_choices, size=self.n_genes)), self.name)

    def mutate(self, arch: ToyArch, rng: Any = None, prob: float = 0.1) -> ToyArch:
        rng = _rng(rng)
        genes = np.array(arch.genes)
        hit = rng.random(self.n_genes) < prob
        genes[hit] = rng.integers(self.n_choices, size=int(hit.sum()))
        if tuple(genes) == arch.genes:  # always a different arch, as SearchSpace.mutate
            g = int(rng.integers(self.n_genes))
            genes[g] = (genes[g] + 1 + rng.integers(self.n_choices - 1)) % self.n_choices
        return ToyArch(tuple(int(v) for v in genes), self.name)

    def crossover(self, a: ToyArch, b: ToyArch, rng: Any = None) -> ToyArch:
        take = _rng(rng).random(self.n_genes) < 0.5
        return ToyArch(tuple(int(x if t else y) for x, y, t in zip(a.genes, b.genes, take, strict=True)), self.name)

    def smallest(self) -> ToyArch:
        return ToyArch((0,) * self.n_genes, self.name)

    def largest(self) -> ToyArch:
        return ToyArch((self.n_choices - 1,) * self.n_genes, self.name)

    def validate(self, arch: Any) -> ToyArch:
        if not isinstance(arch, ToyArch) or arch.space != self.name:
            raise ArchError(f"not an arch of space '{self.name}'")
        if len(arch.genes) != self.n_genes or not all(0 <= g < self.n_choices for g in arch.genes):
            raise ArchError("gene out of range")
        return arch

    def encode(self, arch: ToyArch) -> np.ndarray:
        x = np.zeros(self.encoding_size, dtype=np.float32)
        x[np.arange(self.n_genes) * self.n_choices + np.array(arch.genes)] = 1
        return x

    def all_genes(self) -> np.ndarray:
        return np.array(list(itertools.product(range(self.n_choices), repeat=self.n_genes)))


class ToyTable:
    """Additive latency per (gene, choice), with `predict_many` and the exact range, as LatencyTable has."""

    def __init__(self, space: ToySpace, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.cost = np.sort(rng.uniform(0.05, 1.0, size=(space.n_genes, space.n_choices)), axis=1)

    def of_genes(self, genes: np.ndarray) -> np.ndarray:
        return 1.0 + self.cost[np.arange(genes.shape[1]), genes].sum(axis=1)

    def predict(self, arch: ToyArch) -> float:
        return float(self.of_genes(np.array([arch.genes]))[0])

    def predict_many(self, archs: list[ToyArch]) -> np.ndarray:
        return self.of_genes(np.array([a.genes for a in archs]))

    def latency_range(self, space: ToySpace) -> tuple[float, float]:
        return 1.0 + self.cost.min(axis=1).sum(), 1.0 + self.cost.max(axis=1).sum()


class PlainLatency:
    """Only `predict`: no batch call and no exact range, so the searcher has to estimate the range."""

    def __init__(self, table: ToyTable) -> None:
        self.table = table

    def predict(self, arch: ToyArch) -> float:
        return self.table.predict(arch)


class ToyAccuracy:
    """Additive accuracy that rises with latency, plus noise: the best archs sit at the budget."""

    def __init__(self, table: ToyTable, seed: int = 10) -> None:
        rng = np.random.default_rng(seed)
        self.gain = 20 * table.cost + rng.normal(0, 1.5, size=table.cost.shape)
        self.calls = 0

    def of_genes(self, genes: np.ndarray) -> np.ndarray:
        return 50 + self.gain[np.arange(genes.shape[1]), genes].sum(axis=1)

    def evaluate(self, arch: ToyArch) -> float:
        self.calls += 1
        return float(self.of_genes(np.array([arch.genes]))[0])


@dataclass
class Problem:
    """A space, its latency model and accuracy, and every arch's latency and accuracy (brute force)."""

    space: Any
    latency: Any
    accuracy: Any
    archs: list[Any]
    lat: np.ndarray
    acc: np.ndarray

    def optimum(self, budget: float) -> tuple[Any, float]:
        """The unique most accurate arch within `budget` (asserted unique)."""
        feasible = np.flatnonzero(self.lat <= budget)
        order = feasible[np.argsort(-self.acc[feasible])]
        assert self.acc[order[0]] - self.acc[order[1]] > 1e-9, "the constrained optimum must be unique"
        return self.archs[order[0]], float(self.acc[order[0]])

    def budget(self, quantile: float) -> float:
        return float(np.quantile(self.lat, quantile))


@pytest.fixture(scope="module")
def toy() -> Problem:
    space = ToySpace()
    table = ToyTable(space)
    accuracy = ToyAccuracy(table)
    genes = space.all_genes()
    return Problem(space, table, accuracy, [ToyArch(tuple(int(v) for v in g)) for g in genes], table.of_genes(genes),
                   accuracy.of_genes(genes))


# ---- an hwnas.SearchSpace with a LatencyTable ------------------------------------------------------------
TINY = SearchSpace(
    name="tiny3", in_channels=3, num_classes=4, stem_channels=8, stem_stride=2, stem_act="hswish", first_channels=8,
    stages=tuple(StageSpec(16 + 8 * i, stride=2 if i == 0 else 1, act="hswish", se=i == 1) for i in range(3)),
    final_expand_channels=32, feature_channels=48, head_act="hswish",
    kernel_choices=(3, 5), expand_choices=(2, 4), depth_choices=(1, 2), resolution_choices=(12, 16),
)


def synthetic_table(space: SearchSpace) -> LatencyTable:
    """Bigger blocks are slower: time grows with pixels, channels, kernel and expansion."""
    table = LatencyTable.new(space, profile=None, fingerprint={"cpu": "synthetic"}, device_slug="synthetic")
    for spec in space.all_blocks():
        work = spec.in_size**2 * (spec.cin + spec.cout) * (spec.kernel**2 + 2 * max(spec.hidden, spec.cin)) * 1e-7
        t = {"stem": 0.05, "first": 0.04, "head": 0.2}.get(spec.kind, 0.0) + 0.01 + work + 0.02 * spec.se
        table.record(spec, Timing(median_ms=t, p10_ms=0.9 * t, p90_ms=1.2 * t, mean_ms=t, n=5))
    return table


def every_arch(space: SearchSpace) -> list[Arch]:
    blocks = list(itertools.product(space.kernel_choices, space.expand_choices))
    stage = [b for d in space.depth_choices for b in itertools.product(blocks, repeat=d)]
    archs = []
    for resolution in space.resolution_choices:
        for stages in itertools.product(stage, repeat=space.num_stages):
            flat = [blk for s in stages for blk in s]
            archs.append(Arch(space.name, resolution, tuple(len(s) for s in stages), tuple(k for k, _ in flat),
                              tuple(e for _, e in flat)))
    return archs


class LookupAccuracy:
    """Accuracy from a precomputed table by arch: rises with predicted latency, plus per-choice noise."""

    def __init__(self, archs: list[Arch], acc: np.ndarray) -> None:
        self.index = {a: i for i, a in enumerate(archs)}
        self.acc = acc
        self.calls = 0

    def evaluate(self, arch: Arch) -> float:
        self.calls += 1
        return float(self.acc[self.index[arch]])


def tiny_problem() -> Problem:
    """TINY with the synthetic table and an accuracy that rises with latency, every arch enumerated."""
    table = synthetic_table(TINY)
    archs = every_arch(TINY)
    assert len(archs) == TINY.size() == 16000
    lat = table.predict_many(archs)
    features = np.stack([TINY.encode(a) for a in archs])
    acc = 50 + 25 * lat / lat.max() + features @ np.random.default_rng(3).normal(0, 0.6, TINY.encoding_size)
    return Problem(TINY, table, LookupAccuracy(archs, acc), archs, lat, acc)


@pytest.fixture(scope="module")
def tiny() -> Problem:
    return tiny_problem()


def run(strategy: str, problem: Problem, budget: float | None, **options: Any) -> SearchResult:
    return STRATEGIES[strategy](problem.space, problem.accuracy, problem.latency, budget, **options)


# ---- the budget is hard -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["evolution", "nsga", "random"])
@pytest.mark.parametrize("which", ["toy", "tiny"])
def test_a_returned_arch_never_predicts_over_the_budget(strategy: str, which: str, request: pytest.FixtureRequest
                                                        ) -> None:
    problem: Problem = request.getfixturevalue(which)
    low = float(problem.lat.min())
    budgets = [low * (1 + 1e-9), *(problem.budget(q) for q in (0.01, 0.2, 0.5, 0.9)), float(problem.lat.max())]
    for budget in budgets:
        for seed in range(3):
            result = run(strategy, problem, budget, queries=40, seed=seed, costs=False)
            assert result.best is not None, (budget, seed)
            assert problem.latency.predict(result.best) <= budget
            assert result.best_row is not None and result.best_row["latency_ms"] <= budget
            if strategy != "nsga":  # evolution and random evaluate nothing over the budget
                assert (result.candidates["latency_ms"] <= budget).all() and result.candidates["feasible"].all()
            for other in (budget, low * 1.05, problem.budget(0.3)):  # one NSGA run answers many budgets
                picked = result.best_under(other, problem.latency)
                assert picked is None or problem.latency.predict(picked[0]) <= other


@pytest.mark.parametrize("strategy", ["evolution", "nsga", "random"])
def test_an_infeasible_budget_fails_within_a_second_stating_the_range(strategy: str, toy: Problem,
                                                                      tiny: Problem) -> None:
    cases = [(tiny.space, tiny.latency, "exact"), (toy.space, PlainLatency(toy.latency), "estimated")]
    for space, latency, how in cases:
        low, high = (float(tiny.lat.min()), float(tiny.lat.max())) if space is TINY else \
            toy.latency.latency_range(toy.space)
        evaluator = FunctionEvaluator(lambda arch: 0.0)
        start = time.perf_counter()
        with pytest.raises(BudgetError) as info:
            STRATEGIES[strategy](space, evaluator, latency, 0.9 * low, queries=100)
        assert time.perf_counter() - start < 1.0
        message = str(info.value)
        assert "\n" not in message and how in message and f"{0.9 * low:.4g} ms" in message
        assert f"{low:.4g}-" in message  # the smallest arch is sampled too, so the estimate finds the minimum
        if how == "exact":
            assert f"-{high:.4g} ms" in message
        assert evaluator.calls == 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(BudgetError, match="positive"):
            STRATEGIES[strategy](tiny.space, tiny.accuracy, tiny.latency, bad, queries=10)


# ---- small spaces are solved -------------------------------------------------------------------------------------
# Query budgets stated here: 400 of 16384 toy archs (2.4 %), 250 of 16000 tiny archs (1.6 %).
SOLVE = {"toy": 400, "tiny": 250}


@pytest.mark.parametrize("which", ["toy", "tiny"])
def test_evolution_finds_the_constrained_optimum_exactly(which: str, request: pytest.FixtureRequest) -> None:
    problem: Problem = request.getfixturevalue(which)
    for quantile in (0.25, 0.5, 0.75):
        budget = problem.budget(quantile)
        best, best_acc = problem.optimum(budget)
        for seed in range(3):
            result = evolution_search(problem.space, problem.accuracy, problem.latency, budget,
                                      queries=SOLVE[which], population_size=20, seed=seed, costs=False)
            assert result.queries <= SOLVE[which]
            assert result.best == best, (quantile, seed, result.best_row["accuracy"] if result.best_row is not None
                                         else None, best_acc)


@pytest.mark.parametrize("which", ["toy", "tiny"])
def test_evolution_beats_random_search_on_average(which: str, request: pytest.FixtureRequest) -> None:
    problem: Problem = request.getfixturevalue(which)
    budget = problem.budget(0.5)
    _, best_acc = problem.optimum(budget)
    regret = {"evolution": [], "random": []}
    for seed in range(5):
        for strategy in regret:
            options = {"population_size": 20} if strategy == "evolution" else {}
            result = run(strategy, problem, budget, queries=150, seed=seed, costs=False, **options)
            regret[strategy].append(best_acc - float(result.best_row["accuracy"]))
    assert np.mean(regret["evolution"]) < 0.5 * np.mean(regret["random"]), regret


def test_nsga_front_is_non_dominated_and_beats_random_hypervolume(toy: Problem) -> None:
    ref = (float(toy.lat.max()), float(toy.acc.min()))
    volumes: dict[str, list[float]] = {"nsga": [], "random": []}
    for seed in range(4):
        nsga = nsga_search(toy.space, toy.accuracy, toy.latency, None, queries=300, population_size=30, seed=seed)
        rand = random_search(toy.space, toy.accuracy, toy.latency, ref[0], queries=300, seed=seed)
        front = nsga.front[["latency_ms", "accuracy"]].to_numpy() * [1, -1]
        everyone = nsga.candidates[["latency_ms", "accuracy"]].to_numpy() * [1, -1]
        assert not any(dominates(p, q) for p in everyone for q in front)
        assert len(nsga.front) >= 5 and nsga.front["latency_ms"].is_monotonic_increasing
        for name, result in (("nsga", nsga), ("random", rand)):
            volumes[name].append(hypervolume(result.candidates["latency_ms"], result.candidates["accuracy"], *ref))
    assert np.mean(volumes["nsga"]) >= np.mean(volumes["random"]), volumes
    archive = nsga.history["archive_hypervolume"]
    assert (np.diff(archive) >= -1e-9).all() and archive.iloc[-1] > archive.iloc[0]  # the front found only grows
    assert (nsga.history["hypervolume"] <= archive + 1e-9).all()


# ---- what a result holds ---------------------------------------------------------------------------------------------
def test_history_tracks_population_quality_per_generation(tiny: Problem) -> None:
    budget = tiny.budget(0.5)
    result = evolution_search(tiny.space, tiny.accuracy, tiny.latency, budget, queries=200, population_size=20,
                              seed=0, costs=False)
    history = result.history
    assert history["generation"].tolist() == list(range(len(history)))
    assert history["queries"].iloc[-1] == result.queries == len(result.candidates) == 200
    for column in ("mean_accuracy", "std_accuracy", "best_accuracy", "best_feasible_accuracy", "mean_latency_ms"):
        assert history[column].notna().all()
    # elitist survivors: the population's best and mean never fall, and it ends better than it started
    assert (np.diff(history["best_accuracy"]) >= 0).all() and (np.diff(history["mean_accuracy"]) >= -1e-9).all()
    assert history["mean_accuracy"].iloc[-1] > history["mean_accuracy"].iloc[0]
    assert (history["std_accuracy"] >= 0).all() and (history["mean_latency_ms"] <= budget).all()


def test_candidates_frame_columns_costs_and_front(tiny: Problem, toy: Problem) -> None:
    result = evolution_search(tiny.space, tiny.accuracy, tiny.latency, tiny.budget(0.5), queries=60, seed=1)
    cand = result.candidates
    assert list(cand.columns) == ["arch_id", "latency_ms", "accuracy", "flops", "params", "generation", "feasible",
                                  "arch"]
    assert cand["arch_id"].is_unique and (cand["flops"] > 0).all() and (cand["params"] > 0).all()
    arch = Arch.from_json(cand["arch"].iloc[0])
    assert arch.arch_id == cand["arch_id"].iloc[0]
    from hwnas.flops import arch_flops, arch_params

    assert cand["flops"].iloc[0] == arch_flops(TINY, arch) and cand["params"].iloc[0] == arch_params(TINY, arch)
    assert set(result.front["arch_id"]) <= set(cand["arch_id"])
    assert result.best_row["arch_id"] == result.best.arch_id and result.strategy == "evolution"
    assert "evolution: best" in result.summary()
    other = evolution_search(toy.space, toy.accuracy, toy.latency, toy.budget(0.5), queries=30, seed=1)
    assert other.candidates["flops"].isna().all()  # a foreign space has no FLOPs counter


def test_same_seed_same_search_and_another_seed_another(tiny: Problem) -> None:
    def ids(seed: int) -> list[str]:
        result = run("evolution", tiny, tiny.budget(0.4), queries=80, seed=seed, costs=False)
        return result.candidates["arch_id"].tolist()

    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


def test_seed_population_transfers_an_earlier_search(tiny: Problem) -> None:
    budget = tiny.budget(0.5)
    best, _ = tiny.optimum(budget)
    earlier = nsga_search(tiny.space, tiny.accuracy, tiny.latency, None, queries=60, seed=0, costs=False)
    seeds = [*(earlier.archs[a] for a in earlier.front["arch_id"]), best]
    result = evolution_search(tiny.space, tiny.accuracy, tiny.latency, budget, queries=40, seed=1,
                              seed_population=seeds, costs=False)
    assert result.best == best
    row = result.candidates.set_index("arch_id").loc[best.arch_id]
    assert row["generation"] == 0 and result.info["seeded"] >= 1
    feasible_seeds = [s for s in seeds if tiny.latency.predict(s) <= budget]
    assert result.info["seeded"] == len(feasible_seeds)  # seeds over the budget are left out
    foreign = SearchSpace.from_dict({**TINY.to_dict(), "name": "other"}).smallest()
    with pytest.raises(ArchError, match="other"):
        evolution_search(tiny.space, tiny.accuracy, tiny.latency, budget, queries=10, seed_population=[foreign])


def test_a_small_space_runs_out_instead_of_looping(toy: Problem) -> None:
    space = ToySpace(n_genes=3, n_choices=2)  # 8 archs
    table, accuracy = ToyTable(space), None
    accuracy = ToyAccuracy(table)
    for strategy in set(STRATEGIES) - {"differentiable"}:  # it needs an hwnas.SearchSpace, not a toy
        result = STRATEGIES[strategy](space, accuracy, table, table.latency_range(space)[1], queries=100, seed=0)
        assert result.queries == 8 and "no new arch" in result.stop_reason


def test_strategies_are_dispatched_by_name(tiny: Problem) -> None:
    assert {"evolution", "nsga", "random"} <= set(STRATEGIES)
    result = search("random", tiny.space, tiny.accuracy, tiny.latency, tiny.budget(0.5), queries=10, seed=0)
    assert result.strategy == "random" and result.queries == 10
    known = "differentiable, evolution, nsga, random"
    with pytest.raises(HwnasError, match=f"unknown search strategy 'annealing'; known: {known}"):
        get_strategy("annealing")


def test_confirm_rescores_the_promising_archs_with_the_trusted_evaluator(tiny: Problem) -> None:
    budget = tiny.budget(0.5)
    noise = np.random.default_rng(0).normal(0, 2.0, len(tiny.archs))
    noisy = LookupAccuracy(tiny.archs, tiny.acc + noise)  # a predictor: right on average, wrong in detail
    result = evolution_search(tiny.space, noisy, tiny.latency, budget, queries=300, seed=0)
    trusted = LookupAccuracy(tiny.archs, tiny.acc)
    first = result.candidates["arch_id"].iloc[0]
    known = {first: 123.0}
    confirmed = confirm(result, trusted, top_k=10, latency_model=tiny.latency, known=known)
    assert trusted.calls == 10 and confirmed.metric == "confirmed_accuracy"
    cand = confirmed.candidates
    assert cand["confirmed_accuracy"].notna().sum() == 11
    assert cand.set_index("arch_id").loc[first, "confirmed_accuracy"] == 123.0
    done = cand[cand["confirmed_accuracy"].notna() & cand["feasible"]]
    assert confirmed.best_row["confirmed_accuracy"] == done["confirmed_accuracy"].max()
    assert tiny.latency.predict(confirmed.best) <= budget
    for _, row in confirmed.front.iterrows():
        assert not np.isnan(row["confirmed_accuracy"])


def test_gene_codec_round_trips_and_breeds_valid_archs() -> None:
    from hwnas import spaces

    for space in (TINY, spaces.get("mbv3-32")):
        rng = np.random.default_rng(0)
        codec = GeneCodec(space)
        archs = [space.sample(rng) for _ in range(200)]
        genes = codec.genes(archs, rng)
        assert codec.decode(genes) == archs
        for child in codec.decode(codec.mutate(genes, rng, 0.3)) + codec.decode(codec.crossover(genes, genes[::-1],
                                                                                                  rng)):
            space.validate(child)


def test_slot_latency_prices_gene_rows_as_the_table_does(tiny: Problem) -> None:
    from hwnas import spaces
    from hwnas.genes import SlotLatency

    for space in (TINY, spaces.get("mbv3-32")):
        table = synthetic_table(space)
        rng = np.random.default_rng(0)
        calibration = [(a, 0.8 * table.predict_raw(a) + 0.05 - 0.004 * sum(a.depths))
                       for a in (space.sample(rng) for _ in range(30))]
        for calibrated in (False, True):
            if calibrated:
                table.fit_calibration(calibration, kind="linear+blocks")
            codec = GeneCodec(space)
            genes = codec.random(500, rng)
            expected = table.predict_many(codec.decode(genes))
            assert np.allclose(SlotLatency(codec, table)(genes), expected, rtol=1e-12, atol=1e-12)


def test_the_one_at_a_time_path_and_no_repair_hold_the_budget_too(tiny: Problem) -> None:
    budget = tiny.budget(0.3)
    _, best_acc = tiny.optimum(budget)
    for options in ({"vectorised": False}, {"repair_tries": 0}, {"vectorised": False, "repair_tries": 0}):
        result = evolution_search(tiny.space, tiny.accuracy, tiny.latency, budget, queries=150, population_size=20,
                                  seed=0, costs=False, **options)
        assert (result.candidates["latency_ms"] <= budget).all() and tiny.latency.predict(result.best) <= budget
        assert best_acc - result.best_row["accuracy"] < 0.5, options  # still close to the optimum
