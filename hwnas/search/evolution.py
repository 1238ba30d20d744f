"""Constrained evolution under a hard latency budget (tournament selection, mutation, crossover).

Each generation breeds `population_size` children: a tournament picks each parent, a child is a
uniform crossover of two parents (with probability `crossover_prob`) or a mutation of one.
A child over the budget is repaired (the slowest of a few mutations that fit, since latency
predictions cost nothing next to an accuracy evaluation) or bred again, at most `max_tries` times
per child, so the population never holds an infeasible arch and a generation can come up short
but never hang.
Survivors are the best of parents and children (`survivors="best"`, Once-for-All's elitism) or
the youngest (`"age"`, regularised evolution). Every generation logs the population's quality
(mean, std and best accuracy), as EAT-NAS tracks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.search.budget import check_budget
from hwnas.search.protocols import AccuracyEvaluator, LatencyModel, SearchSpaceLike
from hwnas.search.result import SearchResult
from hwnas.search.state import SearchState
from hwnas.search.variation import Breeder

SURVIVORS = ("best", "age")


def tournament(rng: np.random.Generator, accuracy: np.ndarray, k: int) -> Callable[[int], np.ndarray]:
    """`pick(n)`: n parents, each the most accurate of `k` population members drawn at random."""
    size, k = len(accuracy), min(k, len(accuracy))

    def pick(n: int) -> np.ndarray:
        entrants = rng.integers(size, size=(n, k))
        return entrants[np.arange(n), np.argmax(accuracy[entrants], axis=1)]

    return pick


def evolution_search(space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                     budget_ms: float, *, queries: int = 1000, population_size: int = 50,
                     tournament_size: int | None = None, mutation_prob: float = 0.1, crossover_prob: float = 0.5,
                     survivors: str = "best", seed: int = 0, seed_population: Iterable[Any] | None = None,
                     max_tries: int = 50, progress: bool = False, costs: bool = True,
                     vectorised: bool = True, repair_tries: int = 8, repair_pick: str = "slowest",
                     time_limit_s: float | None = None,
                     patience: int | None = None) -> SearchResult:
    """Evolve archs within `budget_ms` for `queries` evaluations; the best within the budget wins.

    `queries` counts distinct archs evaluated (an arch is never evaluated twice). The initial
    population is `seed_population` (those within the budget; e.g. an earlier run's front) topped
    up with random archs. `tournament_size` defaults to a quarter of the population (at least 2).
    Raises `BudgetError` (with the feasible range) before any evaluation if no arch can meet
    the budget. `vectorised` breeds an `hwnas.SearchSpace`'s children a batch at a time on gene
    rows (`GeneCodec`); False goes through `space.mutate` / `crossover` one child at a time.
    A child over the budget is mended (`Breeder.repair`): of `repair_tries` mutations and as many
    shrinks toward the smallest arch, the slowest one within the budget (`repair_pick="slowest"`)
    or one at random ("random"; on benchmarks/search_regret.py's isolated optima it did no
    better); 0 discards such children instead. The initial population is repaired the same way
    once random draws rarely fit (a budget near the fastest arch). The search stops early after
    `time_limit_s` seconds or `patience` generations without a better arch within the budget.
    """
    if population_size < 2:
        raise HwnasError(f"population_size must be >= 2, got {population_size}")
    if survivors not in SURVIVORS:
        raise HwnasError(f"survivors must be one of {', '.join(SURVIVORS)}, got {survivors!r}")
    if not 0 <= crossover_prob <= 1 or not 0 <= mutation_prob <= 1:
        raise HwnasError("crossover_prob and mutation_prob must lie in [0, 1]")
    k = tournament_size if tournament_size is not None else max(2, population_size // 4)
    if k < 1:
        raise HwnasError(f"tournament_size must be >= 1, got {k}")
    feasible = check_budget(space, latency_model, budget_ms, seed=seed)
    if patience is not None and patience < 1:
        raise HwnasError(f"patience must be >= 1 generation, got {patience}")
    state = SearchState(space, evaluator, latency_model, budget_ms, queries=queries, seed=seed, strategy="evolution",
                        progress=progress, max_tries=max_tries, costs=costs,
                        time_limit_s=time_limit_s)
    rng = state.rng
    breeder = Breeder(space, rng, mutation_prob=mutation_prob, crossover_prob=crossover_prob, vectorised=vectorised,
                      repair_tries=repair_tries, latency_model=latency_model, budget_ms=budget_ms,
                      repair_pick=repair_pick)
    pop, pop_lat, pop_acc = state.initial(population_size, seed_population, feasible_only=True,
                                          repair=breeder if repair_tries > 0 else None)
    genes = breeder.genes(pop)
    age = np.zeros(len(pop), dtype=np.int64)
    state.log(0, pop_acc, pop_lat, len(pop))
    stop = "query budget spent"
    generation = 0
    while state.remaining > 0:
        early = state.early_stop(patience)
        if early:
            stop = early
            break
        generation += 1
        make_batch = breeder.batches(pop, genes, tournament(rng, pop_acc, k), state.seen)
        kids, kid_lat, kid_genes = state.propose(min(population_size, state.remaining), make_batch, feasible_only=True,
                                                 repair=breeder if repair_tries > 0 else None,
                                                 price_rows=breeder.screen)
        if not kids:
            stop = f"no new arch within the budget in {max_tries} tries per child (space exhausted near the budget?)"
            break
        dry = state.drying_up()
        kid_acc = state.record(kids, kid_lat, generation)
        pop = pop + kids
        pop_lat = np.concatenate([pop_lat, kid_lat])
        pop_acc = np.concatenate([pop_acc, kid_acc])
        age = np.concatenate([age, np.full(len(kids), generation)])
        if genes is not None:
            genes = np.concatenate([genes, kid_genes if kid_genes is not None else breeder.genes(kids)])
        if survivors == "best":
            keep = np.lexsort((pop_lat, -pop_acc))[:population_size]  # accuracy down, then latency up
        else:
            keep = np.argsort(-age, kind="stable")[:population_size]
        pop = [pop[i] for i in keep]
        pop_lat, pop_acc, age = pop_lat[keep], pop_acc[keep], age[keep]
        genes = genes[keep] if genes is not None else None
        state.log(generation, pop_acc, pop_lat, len(kids))
        if dry:
            stop = (f"the archs within the budget are all but exhausted: under 1 new arch per {max_tries} proposals "
                    "for 2 generations")
            break
    return state.finish(stop, {"feasible_range_ms": [feasible.low_ms, feasible.high_ms],
                               "range_exact": feasible.exact, "population_size": population_size,
                               "tournament_size": k, "survivors": survivors})
