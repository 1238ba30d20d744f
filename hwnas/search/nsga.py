"""NSGA-II over accuracy and latency: one run yields the whole front, so it answers many budgets.

Parents are chosen by binary tournament on (front rank, crowding distance); children by uniform
crossover or mutation; survivors by non-dominated sorting of parents and children, the last
front cut by crowding distance so the front stays spread over the latency range. The population
is not held to the budget; `budget_ms`, when given, is checked for feasibility up front, decides
`best` (which never predicts over it) and, with `constrained` (the default), the survivors: Deb's
constrained domination puts every arch within the budget before every arch over it, so the
front gathers below the budget asked for (without it the front spans every latency and asked for
one budget NSGA-II did clearly worse than evolution). `best_under(b)` of the result answers any
lower budget from the same run; `constrained=False` (or no budget) keeps the whole front.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.search.budget import check_budget
from hwnas.search.pareto import crowding_distance, hypervolume, non_dominated_sort, pareto_mask
from hwnas.search.protocols import AccuracyEvaluator, LatencyModel, SearchSpaceLike
from hwnas.search.result import SearchResult
from hwnas.search.state import SearchState
from hwnas.search.variation import Breeder


def select_survivors(latency: np.ndarray, accuracy: np.ndarray, n: int,
                     budget_ms: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NSGA-II environmental selection: indices of the `n` survivors, and their ranks and crowding.

    With `budget_ms`, Deb's constrained domination: every arch within the budget ranks before every
    arch over it, and those over it rank one by one by how far over they are.
    """
    objectives = np.column_stack([latency, -accuracy])
    if budget_ms is None:
        ranks = non_dominated_sort(objectives)
    else:
        ranks = np.zeros(len(latency), dtype=np.int64)
        ok = latency <= budget_ms
        if ok.any():
            ranks[ok] = non_dominated_sort(objectives[ok])
        over = np.flatnonzero(~ok)
        first = int(ranks[ok].max()) + 1 if ok.any() else 0
        ranks[over[np.argsort(latency[over], kind="stable")]] = first + np.arange(len(over))
    crowd = np.zeros(len(ranks))
    keep: list[int] = []
    for level in range(int(ranks.max()) + 1 if len(ranks) else 0):
        members = np.flatnonzero(ranks == level)
        crowd[members] = crowding_distance(objectives[members])
        if len(keep) + len(members) <= n:
            keep.extend(members.tolist())
        else:
            order = members[np.argsort(-crowd[members], kind="stable")]
            keep.extend(order[:n - len(keep)].tolist())
        if len(keep) >= n:
            break
    idx = np.asarray(keep, dtype=np.int64)
    return idx, ranks[idx], crowd[idx]


def crowded_tournament(rng: np.random.Generator, ranks: np.ndarray, crowd: np.ndarray) -> Callable[[int], np.ndarray]:
    """`pick(n)`: binary tournaments won by the lower front, then by the lonelier point."""
    size = len(ranks)

    def pick(n: int) -> np.ndarray:
        i, j = rng.integers(size, size=(2, n))
        first = (ranks[i] < ranks[j]) | ((ranks[i] == ranks[j]) & (crowd[i] > crowd[j]))
        return np.where(first, i, j)

    return pick


def nsga_search(space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                budget_ms: float | None = None, *, queries: int = 1000, population_size: int = 50,
                mutation_prob: float = 0.1, crossover_prob: float = 0.5, seed: int = 0, constrained: bool = True,
                seed_population: Iterable[Any] | None = None, max_tries: int = 50,
                progress: bool = False, costs: bool = True, vectorised: bool = True,
                time_limit_s: float | None = None,
                patience: int | None = None) -> SearchResult:
    """Search the accuracy-latency front for `queries` distinct evaluations.

    History rows add `front_size` and `hypervolume` of the population's front and
    `archive_hypervolume` of every candidate so far (NSGA-II's crowding cut may drop a front
    member, so only the latter never falls), against a fixed reference point: the slowest
    latency and the lowest accuracy of the initial population.
    """
    if population_size < 2:
        raise HwnasError(f"population_size must be >= 2, got {population_size}")
    if not 0 <= crossover_prob <= 1 or not 0 <= mutation_prob <= 1:
        raise HwnasError("crossover_prob and mutation_prob must lie in [0, 1]")
    info: dict[str, Any] = {"population_size": population_size}
    if budget_ms is not None:
        feasible = check_budget(space, latency_model, budget_ms, seed=seed)
        info.update(feasible_range_ms=[feasible.low_ms, feasible.high_ms], range_exact=feasible.exact)
    if patience is not None and patience < 1:
        raise HwnasError(f"patience must be >= 1 generation, got {patience}")
    state = SearchState(space, evaluator, latency_model, budget_ms, queries=queries, seed=seed, strategy="nsga",
                        progress=progress, max_tries=max_tries, costs=costs,
                        time_limit_s=time_limit_s)
    rng = state.rng
    limit = budget_ms if constrained else None
    # held to the budget, children over it are mended as evolution's are (they would not survive anyway)
    breeder = Breeder(space, rng, mutation_prob=mutation_prob, crossover_prob=crossover_prob, vectorised=vectorised,
                      latency_model=latency_model if limit is not None else None, budget_ms=limit)
    repair = breeder if limit is not None else None
    pop, pop_lat, pop_acc = state.initial(population_size, seed_population, feasible_only=limit is not None,
                                          repair=repair)
    genes = breeder.genes(pop)
    ref = (float(pop_lat.max()), float(pop_acc.min()))
    info["hypervolume_reference"] = list(ref)
    idx, ranks, crowd = select_survivors(pop_lat, pop_acc, len(pop), limit)
    pop, pop_lat, pop_acc = [pop[i] for i in idx], pop_lat[idx], pop_acc[idx]
    genes = genes[idx] if genes is not None else None

    archive = np.column_stack([pop_lat, pop_acc])[pareto_mask(pop_lat, pop_acc)]

    def log(generation: int, children: int) -> None:
        state.log(generation, pop_acc, pop_lat, children, front_size=int((ranks == 0).sum()),
                  hypervolume=hypervolume(pop_lat, pop_acc, *ref),
                  archive_hypervolume=hypervolume(archive[:, 0], archive[:, 1], *ref))

    log(0, len(pop))
    stop = "query budget spent"
    generation = 0
    while state.remaining > 0:
        early = state.early_stop(patience)
        if early:
            stop = early
            break
        generation += 1
        make_batch = breeder.batches(pop, genes, crowded_tournament(rng, ranks, crowd), state.seen)
        kids, kid_lat, kid_genes = state.propose(min(population_size, state.remaining), make_batch,
                                                 feasible_only=limit is not None, repair=repair,
                                                 price_rows=breeder.screen)
        if not kids:
            stop = f"no new arch in {max_tries} tries per child (space exhausted?)"
            break
        kid_acc = state.record(kids, kid_lat, generation)
        all_archs = pop + kids
        all_lat = np.concatenate([pop_lat, kid_lat])
        all_acc = np.concatenate([pop_acc, kid_acc])
        all_genes = None if genes is None else \
            np.concatenate([genes, kid_genes if kid_genes is not None else breeder.genes(kids)])
        archive = np.concatenate([archive, np.column_stack([kid_lat, kid_acc])])
        archive = archive[pareto_mask(archive[:, 0], archive[:, 1])]
        idx, ranks, crowd = select_survivors(all_lat, all_acc, population_size, limit)
        pop, pop_lat, pop_acc = [all_archs[i] for i in idx], all_lat[idx], all_acc[idx]
        genes = all_genes[idx] if all_genes is not None else None
        log(generation, len(kids))
    return state.finish(stop, info)
