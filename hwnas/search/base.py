"""What every searcher shares: the protocols it depends on, the budget check, and `SearchResult`.

Searchers depend only on protocols, so a space defined outside hwnas (a user's own, or a cell
space scored from a table) is searched without touching hwnas:

- `SearchSpaceLike`: `name`, `sample`, `mutate`, `crossover`, `smallest`, `largest`, `validate`
  (and `encode` / `encoding_size` for the accuracy predictor). Its archs are `ArchLike`: hashable,
  with a stable `arch_id` and `to_json()`.
- `LatencyModel`: `predict(arch) -> ms`; optionally `predict_many(archs)` (used for every batch of
  offspring), `latency_range(space) -> (min, max)`, the exact range a `LatencyTable` gives, and
  `block_cost(spec)`, a promise that latency adds up over blocks (it lets offspring of an
  `hwnas.SearchSpace` be screened from their genes before they are built; see `SlotLatency`).
- `AccuracyEvaluator`: `evaluate(arch) -> accuracy`; optionally `evaluate_many(archs)`.

The budget is a hard constraint: a budget that no arch can meet is a `BudgetError` stating the
feasible range (Once-for-All's evolution loops forever on one), and a returned best arch is
re-checked with `predict` itself, so no rounding in a batched sum can put it over the budget.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from hwnas.errors import BudgetError, HwnasError
from hwnas.search.pareto import pareto_mask

# Columns of `SearchResult.candidates`, in the order they are written to candidates.csv.
COLUMNS = ("arch_id", "latency_ms", "accuracy", "flops", "params", "generation", "feasible", "arch")


# ---- protocols ------------------------------------------------------------------------------------------
@runtime_checkable
class ArchLike(Hashable, Protocol):
    """An arch a searcher can keep: hashable (for deduplication), with a stable id and a JSON form."""

    @property
    def arch_id(self) -> str: ...

    def to_json(self) -> str: ...


@runtime_checkable
class SearchSpaceLike(Protocol):
    """The operations a searcher needs from a space; `hwnas.SearchSpace` is one.

    `mutate` must return an arch different from its input; `rng` is a numpy Generator.
    """

    @property
    def name(self) -> str: ...

    def sample(self, rng: Any = None) -> Any: ...

    def mutate(self, arch: Any, rng: Any = None, prob: float = 0.1) -> Any: ...

    def crossover(self, a: Any, b: Any, rng: Any = None) -> Any: ...

    def smallest(self) -> Any: ...

    def largest(self) -> Any: ...

    def validate(self, arch: Any) -> Any: ...


@runtime_checkable
class EncodableSpace(SearchSpaceLike, Protocol):
    """A space whose archs have fixed-size feature vectors: what the accuracy predictor needs."""

    @property
    def encoding_size(self) -> int: ...

    def encode(self, arch: Any) -> np.ndarray: ...


@runtime_checkable
class LatencyModel(Protocol):
    """Predicted latency in milliseconds (a `LatencyTable`, or anything with `predict`)."""

    def predict(self, arch: Any) -> float: ...


@runtime_checkable
class AccuracyEvaluator(Protocol):
    """Accuracy of an arch, higher is better (a supernet evaluator, a predictor, a lookup table)."""

    def evaluate(self, arch: Any) -> float: ...


def predict_latencies(model: LatencyModel, archs: Sequence[Any]) -> np.ndarray:
    """Latencies of many archs: `predict_many` when the model has it (one call per batch), else a loop."""
    if not archs:
        return np.zeros(0)
    many = getattr(model, "predict_many", None)
    if many is not None:
        return np.asarray(many(archs), dtype=np.float64).reshape(len(archs))
    return np.fromiter((model.predict(a) for a in archs), dtype=np.float64, count=len(archs))


def evaluate_accuracies(evaluator: AccuracyEvaluator, archs: Sequence[Any]) -> np.ndarray:
    """Accuracies of many archs: `evaluate_many` when the evaluator has it, else a loop."""
    if not archs:
        return np.zeros(0)
    many = getattr(evaluator, "evaluate_many", None)
    if many is not None:
        out = np.asarray(many(archs), dtype=np.float64).reshape(len(archs))
    else:
        out = np.fromiter((evaluator.evaluate(a) for a in archs), dtype=np.float64, count=len(archs))
    if not np.isfinite(out).all():
        bad = archs[int(np.flatnonzero(~np.isfinite(out))[0])]
        raise HwnasError(f"the accuracy evaluator returned a non-finite accuracy for arch {_arch_id(bad)}")
    return out


class FunctionEvaluator:
    """An `AccuracyEvaluator` from a plain function of an arch (a lookup table, a synthetic benchmark)."""

    def __init__(self, fn: Callable[[Any], float]) -> None:
        self.fn = fn
        self.calls = 0

    def evaluate(self, arch: Any) -> float:
        self.calls += 1
        return float(self.fn(arch))


def _arch_id(arch: Any) -> str:
    return str(getattr(arch, "arch_id", repr(arch)))


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# ---- the budget --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeasibleRange:
    """Predicted latency range of a space; `exact` when the latency model computed it, not sampled."""

    low_ms: float
    high_ms: float
    exact: bool
    samples: int = 0
    fastest: Any = None  # the fastest arch seen while sampling (None when exact)

    def describe(self) -> str:
        how = "exact, from the latency model" if self.exact else \
            f"estimated from {self.samples} sampled subnets and the smallest"
        return f"{self.low_ms:.4g}-{self.high_ms:.4g} ms ({how})"


def feasible_range(space: SearchSpaceLike, latency_model: LatencyModel, *, samples: int = 2000, seed: int = 0,
                   time_limit_s: float = 0.5) -> FeasibleRange:
    """The predicted latency range of `space`: exact via `latency_range` when the model offers it.

    Otherwise the smallest and largest archs plus up to `samples` random ones drawn for at most
    `time_limit_s`: a bounded estimate (the true minimum may lie lower), never an endless loop.
    """
    exact = getattr(latency_model, "latency_range", None)
    if exact is not None:
        low, high = exact(space)
        return FeasibleRange(float(low), float(high), exact=True)
    rng = _as_generator(seed)
    archs = [space.smallest(), space.largest()]
    start = time.perf_counter()
    while len(archs) < samples + 2 and time.perf_counter() - start < time_limit_s:
        archs.extend(space.sample(rng) for _ in range(min(100, samples + 2 - len(archs))))
    lat = predict_latencies(latency_model, archs)
    i = int(np.argmin(lat))
    return FeasibleRange(float(lat.min()), float(lat.max()), exact=False, samples=len(archs) - 2, fastest=archs[i])


def check_budget(space: SearchSpaceLike, latency_model: LatencyModel, budget_ms: float, *,
                 seed: int = 0) -> FeasibleRange:
    """Refuse a budget no arch of `space` can meet, with the feasible range; return the range."""
    budget = float(budget_ms)
    if not math.isfinite(budget) or budget <= 0:
        raise BudgetError(f"latency budget must be a positive number of milliseconds, got {budget_ms!r}")
    rng = feasible_range(space, latency_model, seed=seed)
    if budget < rng.low_ms:
        raise BudgetError(f"no subnet of space '{space.name}' meets a latency budget of {budget:.4g} ms: "
                          f"predicted latencies span {rng.describe()}")
    return rng


# ---- the result ----------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Everything a search evaluated, its accuracy-latency front and the best arch within the budget.

    `candidates` has one row per evaluated arch (COLUMNS, plus `confirmed_accuracy` once `confirm`
    re-scored some); `metric` names the accuracy column that `front` and `best` are chosen by.
    `history` has one row per generation: population quality (mean, std, best accuracy) and counts.
    `supernet_state` is the `state_dict` of the shared weights when the search changed them (the
    differentiable strategy with `finetune=True`): `best` is deployable with those weights only.
    """

    candidates: pd.DataFrame
    front: pd.DataFrame
    best: Any | None
    best_row: pd.Series | None
    history: pd.DataFrame
    budget_ms: float | None
    strategy: str
    seed: int
    space: str
    queries: int
    stop_reason: str
    archs: dict[str, Any] = field(repr=False, default_factory=dict)
    metric: str = "accuracy"
    info: dict[str, Any] = field(default_factory=dict)
    supernet_state: dict[str, Any] | None = field(repr=False, default=None)

    def best_under(self, budget_ms: float, latency_model: LatencyModel | None = None) -> tuple[Any, pd.Series] | None:
        """The best evaluated arch within another budget: one NSGA run answers many budgets.

        With `latency_model`, the pick is re-checked with its `predict`, as `best` is.
        """
        return pick_best(self.candidates, self.archs, budget_ms, latency_model, self.metric)

    def summary(self) -> str:
        if self.best_row is None:
            return f"{self.strategy}: no arch within {self.budget_ms} ms among {len(self.candidates)} candidates"
        row = self.best_row
        return (f"{self.strategy}: best {row['arch_id']} at {row['latency_ms']:.4g} ms, "
                f"{self.metric} {row[self.metric]:.4g} ({len(self.candidates)} candidates, {self.queries} queries)")


def pick_best(candidates: pd.DataFrame, archs: dict[str, Any], budget_ms: float | None,
              latency_model: LatencyModel | None = None, metric: str = "accuracy") -> tuple[Any, pd.Series] | None:
    """The most accurate candidate within `budget_ms` (ties: the faster), re-checked with `predict`."""
    rows = candidates[candidates[metric].notna()]
    if budget_ms is not None:
        rows = rows[rows["latency_ms"] <= budget_ms]
    if rows.empty:
        return None
    rows = rows.sort_values([metric, "latency_ms"], ascending=[False, True], kind="stable")
    for _, row in rows.head(50).iterrows():
        arch = archs[row["arch_id"]]
        if budget_ms is None or latency_model is None or latency_model.predict(arch) <= budget_ms:
            return arch, row
    return None


def front_of(candidates: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """The non-dominated rows (fast and accurate), fastest first."""
    rows = candidates[candidates[metric].notna()]
    if rows.empty:
        return rows.copy()
    mask = pareto_mask(rows["latency_ms"].to_numpy(), rows[metric].to_numpy())
    return rows[mask].sort_values(["latency_ms", metric], ascending=[True, False], kind="stable").reset_index(drop=True)


class ArchCosts:
    """FLOPs and parameters of archs of an `hwnas.SearchSpace`, summed from per-slot cached block counts.

    A block's spec depends only on (resolution, stage, index, kernel, expand), so each slot is
    counted once (`hwnas.flops`) and an arch costs a few dictionary lookups: cheap enough for
    every one of 50k candidates.
    """

    def __init__(self, space: Any) -> None:
        self.space = space
        self._slots: dict[Any, tuple[int, int]] = {}

    @staticmethod
    def supports(space: Any) -> bool:
        from hwnas.space import SearchSpace

        return isinstance(space, SearchSpace)

    def __call__(self, arch: Any) -> tuple[int, int]:
        slots = self._slots
        res = arch.resolution
        try:
            flops, params = slots[res]
            start = 0
            for stage, depth in enumerate(arch.depths):
                for index in range(depth):
                    f, p = slots[(res, stage, index, arch.kernels[start + index], arch.expands[start + index])]
                    flops += f
                    params += p
                start += depth
            return flops, params
        except KeyError:
            return self._fill(arch)

    def _fill(self, arch: Any) -> tuple[int, int]:
        from hwnas.flops import block_flops, block_params

        space = self.space
        specs = space.blocks(arch)
        costs = [(block_flops(s, space.se_ratio), block_params(s, space.se_ratio)) for s in specs]
        mb = [c for s, c in zip(specs, costs, strict=True) if s.kind == "mbconv"]
        for (stage, index, kernel, expand), cost in zip(space.iter_stage_blocks(arch), mb, strict=True):
            self._slots[(arch.resolution, stage, index, kernel, expand)] = cost
        fixed = [c for s, c in zip(specs, costs, strict=True) if s.kind != "mbconv"]
        self._slots[arch.resolution] = (sum(f for f, _ in fixed), sum(p for _, p in fixed))
        return sum(f for f, _ in costs), sum(p for _, p in costs)


def build_result(space: SearchSpaceLike, archs: Sequence[Any], latency: Sequence[float], accuracy: Sequence[float],
                 generation: Sequence[int], *, budget_ms: float | None, latency_model: LatencyModel | None,
                 strategy: str, seed: int, history: Sequence[dict[str, Any]], stop_reason: str,
                 info: dict[str, Any] | None = None, costs: bool = True) -> SearchResult:
    """Assemble a `SearchResult` from a searcher's parallel lists of evaluated archs.

    `costs=False` leaves FLOPs and parameters empty: counting them costs torch's flop counter
    about 10 ms per distinct block the first time a process meets it (seconds for a whole space).
    """
    n = len(archs)
    lat = np.asarray(latency, dtype=np.float64)
    arch_costs = ArchCosts(space) if costs and ArchCosts.supports(space) else None
    if arch_costs is not None and n:
        fp = np.array([arch_costs(a) for a in archs], dtype=np.float64)
        flops, params = fp[:, 0], fp[:, 1]
    else:
        flops = params = np.full(n, np.nan)
    candidates = pd.DataFrame({
        "arch_id": [a.arch_id for a in archs],
        "latency_ms": lat,
        "accuracy": np.asarray(accuracy, dtype=np.float64),
        "flops": flops,
        "params": params,
        "generation": np.asarray(generation, dtype=np.int64),
        "feasible": lat <= budget_ms if budget_ms is not None else np.ones(n, dtype=bool),
        "arch": [a.to_json() for a in archs],
    }, columns=list(COLUMNS))
    by_id = dict(zip(candidates["arch_id"], archs, strict=True))
    picked = pick_best(candidates, by_id, budget_ms, latency_model)
    return SearchResult(
        candidates=candidates, front=front_of(candidates), best=picked[0] if picked else None,
        best_row=picked[1] if picked else None, history=pd.DataFrame(list(history)),
        budget_ms=budget_ms, strategy=strategy, seed=seed, space=str(space.name), queries=n,
        stop_reason=stop_reason, archs=by_id, info=dict(info or {}))


# ---- confirmation ------------------------------------------------------------------------------------------------
def confirm(result: SearchResult, evaluator: AccuracyEvaluator, *, top_k: int = 20,
            latency_model: LatencyModel | None = None, known: dict[str, float] | None = None) -> SearchResult:
    """Re-score the most promising candidates with a trusted evaluator (the supernet) and choose by it.

    A predictor ranks the bulk; this re-scores up to `top_k` archs: the best predicted ones
    within the budget first (where the answer is decided), then front members spread over the
    latency range. Candidates whose trusted accuracy is already `known` (by arch_id, e.g. the
    predictor's training pairs) take it at no cost. The returned result's `metric` is
    `confirmed_accuracy`: `front` and `best` are chosen among the confirmed archs only.
    """
    if top_k < 0:
        raise HwnasError(f"confirm needs top_k >= 0, got {top_k}")
    known = dict(known or {})
    cand = result.candidates
    todo = cand[~cand["arch_id"].isin(list(known))]
    chosen: list[str] = []
    feasible = todo[todo["feasible"]].sort_values(["accuracy", "latency_ms"], ascending=[False, True], kind="stable")
    chosen.extend(feasible["arch_id"].head(top_k if result.strategy != "nsga" else max(1, top_k // 2)))
    front = front_of(todo)
    if len(front) and top_k:
        picks = np.unique(np.linspace(0, len(front) - 1, num=min(len(front), top_k)).round().astype(int))
        chosen.extend(front["arch_id"].iloc[picks])
    chosen = list(dict.fromkeys(chosen))[:top_k]
    scores = evaluate_accuracies(evaluator, [result.archs[a] for a in chosen])
    known.update(zip(chosen, scores.tolist(), strict=True))
    candidates = cand.copy()
    candidates.insert(int(candidates.columns.get_loc("accuracy")) + 1, "confirmed_accuracy",
                      cand["arch_id"].map(known).astype(np.float64))
    metric = "confirmed_accuracy"
    picked = pick_best(candidates, result.archs, result.budget_ms, latency_model, metric)
    info = {**result.info, "confirmed": len(chosen),
            "confirmed_known": int(candidates[metric].notna().sum()) - len(chosen)}
    return replace(result, candidates=candidates, front=front_of(candidates, metric),
                   best=picked[0] if picked else None, best_row=picked[1] if picked else None, metric=metric,
                   info=info)


# ---- variation ----------------------------------------------------------------------------------------------------
class GeneCodec:
    """Archs of an `hwnas.SearchSpace` as rows of choice indices, for vectorised mutation and crossover.

    Columns: resolution, depth per stage, then kernel and expand of every slot of every stage up
    to the maximum depth. Slots beyond a stage's depth are latent genes: they do not change the
    network, but a child inherits them, so growing a stage back restores its parent's blocks
    (Once-for-All keeps them the same way). Variation is per gene, as `SearchSpace.mutate` and
    `crossover` do it: mutation resamples each gene with probability `prob`, crossover takes each
    gene from either parent.
    """

    def __init__(self, space: Any) -> None:
        self.space = space
        self.stages, self.depth = space.num_stages, space.max_depth
        self.res_choices = tuple(space.resolution_choices)
        self.depth_choices = tuple(space.depth_choices)
        self.kernel_choices = tuple(space.kernel_choices)
        self.expand_choices = tuple(space.expand_choices)
        slots = self.stages * self.depth
        self.k0, self.e0 = 1 + self.stages, 1 + self.stages + slots
        self.width = 1 + self.stages + 2 * slots
        self.cardinality = np.array([len(self.res_choices)] + [len(self.depth_choices)] * self.stages
                                    + [len(self.kernel_choices)] * slots + [len(self.expand_choices)] * slots)

    @staticmethod
    def supports(space: Any) -> bool:
        from hwnas.space import SearchSpace

        return isinstance(space, SearchSpace)

    def genes(self, archs: Sequence[Any], rng: np.random.Generator) -> np.ndarray:
        """Gene rows of `archs`; latent slots are drawn at random."""
        g = self.random(len(archs), rng)
        res = {v: i for i, v in enumerate(self.res_choices)}
        dep = {v: i for i, v in enumerate(self.depth_choices)}
        ker = {v: i for i, v in enumerate(self.kernel_choices)}
        exp = {v: i for i, v in enumerate(self.expand_choices)}
        for row, arch in enumerate(archs):
            g[row, 0] = res[arch.resolution]
            j = 0
            for s, d in enumerate(arch.depths):
                g[row, 1 + s] = dep[d]
                for i in range(d):
                    g[row, self.k0 + s * self.depth + i] = ker[arch.kernels[j]]
                    g[row, self.e0 + s * self.depth + i] = exp[arch.expands[j]]
                    j += 1
        return g

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.cardinality, size=(n, self.width))

    def decode(self, genes: np.ndarray) -> list[Any]:
        from hwnas.space import Arch

        name, depth = self.space.name, self.depth
        rc, dc, kc, ec = self.res_choices, self.depth_choices, self.kernel_choices, self.expand_choices
        out = []
        for row in genes.tolist():
            depths = [dc[i] for i in row[1:self.k0]]
            kernels: list[int] = []
            expands: list[float] = []
            for s, d in enumerate(depths):
                start = s * depth
                kernels.extend(kc[i] for i in row[self.k0 + start:self.k0 + start + d])
                expands.extend(ec[i] for i in row[self.e0 + start:self.e0 + start + d])
            out.append(Arch(name, rc[row[0]], tuple(depths), tuple(kernels), tuple(expands)))
        return out

    def mutate(self, genes: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
        hit = rng.random(genes.shape) < prob
        return np.where(hit, self.random(len(genes), rng), genes)

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.where(rng.random(a.shape) < 0.5, b, a)


class SlotLatency:
    """Latency of gene rows without building archs, for a model that adds up per-block costs.

    A `LatencyTable` predicts `intercept + sum of block_cost(spec)` over an arch's blocks, and a
    block's spec depends only on (resolution, stage, index, kernel, expand): one small cost tensor
    then prices any gene row with numpy. Searchers use it to screen offspring and repair variants
    before decoding them; every arch they keep is still priced by the model's own `predict_many`.
    """

    def __init__(self, codec: GeneCodec, model: Any) -> None:
        from hwnas.space import Arch

        space = codec.space
        s, d = codec.stages, codec.depth
        self.cost = np.zeros((len(codec.res_choices), s, d, len(codec.kernel_choices), len(codec.expand_choices)))
        self.fixed = np.zeros(len(codec.res_choices))
        self.depth_values = np.asarray(codec.depth_choices)
        self.codec = codec
        probe = None
        for r, res in enumerate(codec.res_choices):
            for k, kernel in enumerate(codec.kernel_choices):
                for e, expand in enumerate(codec.expand_choices):
                    arch = Arch(space.name, res, (d,) * s, (kernel,) * (s * d), (expand,) * (s * d))
                    specs = space.blocks(arch)
                    mb = iter(spec for spec in specs if spec.kind == "mbconv")
                    for stage, index, _, _ in space.iter_stage_blocks(arch):
                        self.cost[r, stage, index, k, e] = model.block_cost(next(mb))
                    self.fixed[r] = sum(model.block_cost(spec) for spec in specs if spec.kind != "mbconv")
                    probe = probe or (arch, specs)
        assert probe is not None
        self.intercept = float(model.predict(probe[0])) - sum(model.block_cost(spec) for spec in probe[1])

    @staticmethod
    def supports(codec: GeneCodec | None, model: Any) -> bool:
        return codec is not None and callable(getattr(model, "block_cost", None))

    def __call__(self, genes: np.ndarray) -> np.ndarray:
        c = self.codec
        n, s, d = len(genes), c.stages, c.depth
        res = genes[:, 0]
        depth = self.depth_values[genes[:, 1:c.k0]]
        kernel = genes[:, c.k0:c.e0].reshape(n, s, d)
        expand = genes[:, c.e0:].reshape(n, s, d)
        cost = self.cost[res[:, None, None], np.arange(s)[None, :, None], np.arange(d)[None, None, :], kernel, expand]
        active = np.arange(d)[None, None, :] < depth[:, :, None]
        return self.fixed[res] + (cost * active).sum(axis=(1, 2)) + self.intercept


class Breeder:
    """Children of a population: through the space's own `mutate` / `crossover` (any `SearchSpaceLike`),
    or a whole batch at once through `GeneCodec` for an `hwnas.SearchSpace` (the hot path of a
    50k-candidate search).

    A child is a crossover of two parents (with probability `crossover_prob`) or a mutation of
    its first parent. A child that was evaluated before is mutated again (up to `remutations`
    times): once a population has converged, its one-step neighbours are all known, and walking
    one more step finds new archs (two-gene moves, which a budget-bound optimum often needs)
    instead of proposing known ones until the tries run out. With `budget_ms` and a latency
    model that has `block_cost` (a `LatencyTable`), gene rows are screened by `SlotLatency`
    first: a child over the budget comes back as None (with its genes) for `repair`, undecoded.
    """

    def __init__(self, space: SearchSpaceLike, rng: np.random.Generator, *, mutation_prob: float,
                 crossover_prob: float, vectorised: bool = True, remutations: int = 3, repair_tries: int = 8,
                 latency_model: LatencyModel | None = None, budget_ms: float | None = None) -> None:
        self.space, self.rng = space, rng
        self.mutation_prob, self.crossover_prob = mutation_prob, crossover_prob
        self.remutations, self.repair_tries = remutations, repair_tries
        self.codec = GeneCodec(space) if vectorised and GeneCodec.supports(space) else None
        self.budget_ms = budget_ms
        self.screen = None
        if self.codec is not None and latency_model is not None and SlotLatency.supports(self.codec, latency_model):
            self.screen = SlotLatency(self.codec, latency_model)

    def genes(self, archs: Sequence[Any]) -> np.ndarray | None:
        return None if self.codec is None else self.codec.genes(archs, self.rng)

    def batches(self, archs: Sequence[Any], genes: np.ndarray | None, pick: Callable[[int], np.ndarray],
                seen: set[Any]) -> Callable[[int], tuple[list[Any], np.ndarray | None]]:
        """`make_batch(n)` for `SearchState.propose`: n children of parents chosen by `pick(n)`."""

        def make_batch(n: int) -> tuple[list[Any], np.ndarray | None]:
            return self.breed(archs, genes, pick(n), pick(n), seen)

        return make_batch

    def _over(self, rows: np.ndarray) -> np.ndarray:
        """Rows that the screen prices over the budget (with a hair of slack for summation order)."""
        if self.screen is None or self.budget_ms is None:
            return np.zeros(len(rows), dtype=bool)
        return self.screen(rows) > self.budget_ms * (1 + 1e-9)

    def breed(self, archs: Sequence[Any], genes: np.ndarray | None, first: np.ndarray, second: np.ndarray,
              seen: set[Any]) -> tuple[list[Any], np.ndarray | None]:
        """One child per (first, second) pair of population indices; None for a child screened out."""
        rng, space, prob = self.rng, self.space, self.mutation_prob
        cross = rng.random(len(first)) < self.crossover_prob
        if self.codec is None or genes is None:
            kids = []
            for i, j, c in zip(first.tolist(), second.tolist(), cross.tolist(), strict=True):
                kid = space.crossover(archs[i], archs[j], rng) if c and i != j else space.mutate(archs[i], rng, prob)
                for _ in range(self.remutations):
                    if kid not in seen:
                        break
                    kid = space.mutate(kid, rng, prob)
                kids.append(kid)
            return kids, None
        codec = self.codec
        g1 = genes[first]
        child = np.where(cross[:, None], codec.crossover(g1, genes[second], rng), codec.mutate(g1, rng, prob))
        keep = np.flatnonzero(~self._over(child))
        kids_list: list[Any] = [None] * len(child)
        for i, kid in zip(keep.tolist(), codec.decode(child[keep]), strict=True):
            kids_list[i] = kid
        for _ in range(self.remutations):
            again = [i for i in keep.tolist() if kids_list[i] in seen]
            if not again:
                break
            child[again] = codec.mutate(child[again], rng, prob)
            for i, kid in zip(again, codec.decode(child[again]), strict=True):
                kids_list[i] = kid
        return kids_list, child

    def repair(self, archs: Sequence[Any], genes: np.ndarray | None, latency_model: LatencyModel, budget_ms: float,
               known: Sequence[set[Any]] = ()) -> tuple[list[Any], np.ndarray | None, np.ndarray]:
        """Children over the budget, mended: of `repair_tries` mutations of each, the slowest new one within it.

        Latency predictions are cheap and accuracy evaluations are not, so an over-budget child is
        worth a few more mutations rather than a discarded proposal. The slowest feasible variant
        is kept because accuracy rises with latency in every NAS space: the best archs sit just
        under the budget. Variants in any of the `known` sets do not count; archs no variant can
        mend are dropped. Returns the mended archs, their gene rows and their `predict_many` latency.
        """
        t = self.repair_tries
        if t < 1 or len(archs) == 0:
            return [], None, np.zeros(0)
        rng, prob = self.rng, self.mutation_prob

        def new(arch: Any) -> bool:
            return not any(arch in k for k in known)

        if self.codec is not None and genes is not None:
            rows = self.codec.mutate(np.repeat(genes, t, axis=0), rng, prob)
            if self.screen is not None:
                est = self.screen(rows).reshape(len(genes), t)
                order = np.argsort(-np.where(est <= budget_ms, est, -np.inf), axis=1)
                picked: dict[Any, int] = {}
                for i in range(len(genes)):
                    for j in order[i].tolist():
                        if est[i, j] > budget_ms:
                            break
                        arch = self.codec.decode(rows[i * t + j:i * t + j + 1])[0]
                        if new(arch) and arch not in picked:
                            picked[arch] = i * t + j
                            break
                mended = list(picked)
                lat = predict_latencies(latency_model, mended)
                ok = np.flatnonzero(lat <= budget_ms)
                return [mended[i] for i in ok], rows[[picked[mended[i]] for i in ok]], lat[ok]
            variants = self.codec.decode(rows)
        else:
            rows = None
            variants = [self.space.mutate(a, rng, prob) for a in archs for _ in range(t)]
        lat = predict_latencies(latency_model, variants)
        ok = (lat <= budget_ms) & np.fromiter((new(v) for v in variants), dtype=bool, count=len(variants))
        score = np.where(ok, lat, -np.inf).reshape(len(archs), t)
        best = np.argmax(score, axis=1)
        picks = [i * t + int(best[i]) for i in range(len(archs)) if np.isfinite(score[i, best[i]])]
        picks = list({variants[p]: p for p in picks}.values())  # two children may mend to one arch
        return [variants[p] for p in picks], None if rows is None else rows[picks], lat[picks]


# ---- the common loop ------------------------------------------------------------------------------------------
class SearchState:
    """The bookkeeping every searcher shares: what was evaluated, the query budget, the progress bar.

    Deduplication is by the arch itself (hashable), so an arch is never paid for twice; offspring
    are proposed in batches and scored with one `predict_many` / `evaluate_many` call per batch.
    """

    def __init__(self, space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                 budget_ms: float | None, *, queries: int, seed: int, strategy: str, progress: bool = False,
                 max_tries: int = 50, costs: bool = True) -> None:
        if queries < 1:
            raise HwnasError(f"queries must be >= 1, got {queries}")
        if max_tries < 1:
            raise HwnasError(f"max_tries must be >= 1, got {max_tries}")
        self.space, self.evaluator, self.latency_model = space, evaluator, latency_model
        self.budget_ms = None if budget_ms is None else float(budget_ms)
        self.queries, self.seed, self.strategy, self.max_tries = int(queries), int(seed), strategy, int(max_tries)
        self.rng = np.random.default_rng(seed)
        self.costs = costs
        self.archs: list[Any] = []
        self.latency: list[float] = []
        self.accuracy: list[float] = []
        self.generation: list[int] = []
        self.seen: set[Any] = set()
        self.history: list[dict[str, Any]] = []
        self.rejected = 0
        self.repaired = 0
        self.seeded = 0
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.queries, desc=f"search {strategy}", unit="arch", file=sys.stderr,
                            dynamic_ncols=True)

    @property
    def remaining(self) -> int:
        return self.queries - len(self.archs)

    def feasible(self, latency: float) -> bool:
        return self.budget_ms is None or latency <= self.budget_ms

    def propose(self, n: int, make_batch: Callable[[int], tuple[list[Any], np.ndarray | None]], *,
                feasible_only: bool, repair: Breeder | None = None) -> tuple[list[Any], np.ndarray, np.ndarray | None]:
        """Up to `n` new archs from `make_batch(m)`, not evaluated before, within the budget if `feasible_only`.

        `make_batch` returns m archs and, optionally, their gene rows (kept for the accepted ones).
        Archs over the budget go to `repair` (a `Breeder`) when given, else are dropped. At most
        `max_tries * n` proposals: a budget that few archs meet, or a space that is exhausted,
        ends with fewer archs instead of a loop without end.
        """
        out: list[Any] = []
        lats: list[float] = []
        rows: list[np.ndarray] = []
        taken: set[Any] = set()
        tries = 0
        limit = self.max_tries * n
        seen, budget = self.seen, self.budget_ms
        while len(out) < n and tries < limit:
            need = min(n - len(out), limit - tries)
            batch, genes = make_batch(need)
            tries += need
            fresh, screened = [], []  # screened: priced over the budget from genes, never decoded (None)
            for i, arch in enumerate(batch):
                if arch is None:
                    screened.append(i)
                elif arch not in seen and arch not in taken:
                    taken.add(arch)
                    fresh.append(i)
            lat = predict_latencies(self.latency_model, [batch[i] for i in fresh])
            ok = np.ones(len(fresh), dtype=bool) if not feasible_only or budget is None else lat <= budget
            keep = [fresh[j] for j in np.flatnonzero(ok)][:n - len(out)]
            out.extend(batch[i] for i in keep)
            lats.extend(lat[ok][:len(keep)].tolist())
            if genes is not None:
                rows.append(genes[keep])
            bad = [fresh[j] for j in np.flatnonzero(~ok)] + screened
            if bad and repair is not None and budget is not None and len(out) < n:
                fixed, fixed_genes, fixed_lat = repair.repair([batch[i] for i in bad],
                                                              None if genes is None else genes[bad],
                                                              self.latency_model, budget, (seen, taken))
                fixed, fixed_lat = fixed[:n - len(out)], fixed_lat[:n - len(out)]
                taken.update(fixed)
                out.extend(fixed)
                lats.extend(fixed_lat.tolist())
                if fixed_genes is not None:
                    rows.append(fixed_genes[:len(fixed)])
                self.repaired += len(fixed)
                self.rejected += len(bad) - len(fixed)
            else:
                self.rejected += len(bad)
        genes_out = np.concatenate(rows) if rows else None
        return out, np.asarray(lats, dtype=np.float64), genes_out

    def record(self, archs: Sequence[Any], latency: np.ndarray, generation: int) -> np.ndarray:
        """Evaluate `archs` (new, at most `remaining`) and keep them as candidates; returns their accuracies."""
        archs = list(archs)[:max(self.remaining, 0)]
        if not archs:
            return np.zeros(0)
        acc = evaluate_accuracies(self.evaluator, archs)
        self.archs.extend(archs)
        self.latency.extend(latency[:len(archs)].tolist())
        self.accuracy.extend(acc.tolist())
        self.generation.extend([generation] * len(archs))
        self.seen.update(archs)
        if self.bar is not None:
            self.bar.update(len(archs))
        return acc

    def log(self, generation: int, population_acc: np.ndarray, population_lat: np.ndarray, children: int,
            **extra: Any) -> None:
        """One history row: the population's quality after `generation`."""
        acc = np.asarray(self.accuracy)
        lat = np.asarray(self.latency)
        ok = lat <= self.budget_ms if self.budget_ms is not None else np.ones(len(acc), dtype=bool)
        row = {
            "generation": generation, "queries": len(self.archs), "children": children, "rejected": self.rejected,
            "mean_accuracy": float(np.mean(population_acc)) if len(population_acc) else math.nan,
            "std_accuracy": float(np.std(population_acc)) if len(population_acc) else math.nan,
            "best_accuracy": float(np.max(population_acc)) if len(population_acc) else math.nan,
            "mean_latency_ms": float(np.mean(population_lat)) if len(population_lat) else math.nan,
            "best_feasible_accuracy": float(acc[ok].max()) if ok.any() else math.nan,
            **extra,
        }
        self.history.append(row)
        if self.bar is not None and not math.isnan(row["best_feasible_accuracy"]):
            self.bar.set_postfix(best=f"{row['best_feasible_accuracy']:.4g}", gen=generation, refresh=False)

    def seeds(self, seed_population: Iterable[Any] | None, *, feasible_only: bool) -> tuple[list[Any], np.ndarray]:
        """The seed archs that belong to the space (validated), are new, and (if asked) within budget."""
        if not seed_population:
            return [], np.zeros(0)
        archs = list(dict.fromkeys(self.space.validate(a) or a for a in seed_population))
        archs = [a for a in archs if a not in self.seen]
        lat = predict_latencies(self.latency_model, archs)
        keep = [i for i, v in enumerate(lat.tolist()) if not feasible_only or self.feasible(v)]
        return [archs[i] for i in keep], lat[keep]

    def initial(self, n: int, seed_population: Iterable[Any] | None, *, feasible_only: bool,
                generation: int = 0) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """The first population: seeds, then random samples; within budget when `feasible_only`.

        With a budget, at least one member is within it: if random sampling finds none (a budget
        near the fastest arch), a descent on latency from the smallest arch supplies one.
        """
        n = min(n, self.remaining)
        archs, lat = self.seeds(seed_population, feasible_only=feasible_only)
        archs, lat = archs[:n], lat[:n]
        self.seeded = len(archs)
        if len(archs) < n:
            more, more_lat, _ = self.propose(n - len(archs), lambda m: ([self.space.sample(self.rng)
                                                                          for _ in range(m)], None),
                                             feasible_only=feasible_only)
            archs, lat = archs + more, np.concatenate([lat, more_lat])
        if self.budget_ms is not None and not (lat <= self.budget_ms).any():
            fast, fast_lat = self.descend()
            archs, lat = archs[:n - 1] + fast, np.concatenate([lat[:n - 1], fast_lat])
        acc = self.record(archs, lat, generation)
        return archs, lat, acc

    def descend(self) -> tuple[list[Any], np.ndarray]:
        """Find one arch within the budget by walking down in latency from the smallest arch."""
        current = self.space.smallest()
        best = float(predict_latencies(self.latency_model, [current])[0])
        for _ in range(self.max_tries):
            if self.feasible(best):
                break
            moves = [self.space.mutate(current, self.rng, 0.1) for _ in range(32)]
            lat = predict_latencies(self.latency_model, moves)
            i = int(np.argmin(lat))
            if lat[i] < best:
                current, best = moves[i], float(lat[i])
        if not self.feasible(best) or current in self.seen:
            raise BudgetError(f"found no subnet of space '{self.space.name}' within {self.budget_ms:.4g} ms "
                              f"(fastest found: {best:.4g} ms); raise the budget")
        return [current], np.array([best])

    def finish(self, stop_reason: str, info: dict[str, Any] | None = None) -> SearchResult:
        if self.bar is not None:
            self.bar.close()
        extra = {"rejected_infeasible": self.rejected, "repaired": self.repaired, "seeded": self.seeded, **(info or {})}
        return build_result(self.space, self.archs, self.latency, self.accuracy, self.generation,
                            budget_ms=self.budget_ms, latency_model=self.latency_model, strategy=self.strategy,
                            seed=self.seed, history=self.history, stop_reason=stop_reason, info=extra,
                            costs=self.costs)
