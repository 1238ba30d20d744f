"""Random search: uniform archs within the budget, the baseline every searcher has to beat.

Archs are drawn with `space.sample`, those over the budget discarded (at most `max_tries` draws
per kept arch), and scored in batches. Same interface and result as the other searchers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.search.budget import check_budget
from hwnas.search.protocols import AccuracyEvaluator, LatencyModel, SearchSpaceLike
from hwnas.search.result import SearchResult
from hwnas.search.state import SearchState


def random_search(space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                  budget_ms: float, *, queries: int = 1000, batch_size: int = 100, seed: int = 0,
                  seed_population: Iterable[Any] | None = None, max_tries: int = 50,
                  progress: bool = False, costs: bool = True, time_limit_s: float | None = None) -> SearchResult:
    """Evaluate up to `queries` distinct random archs within `budget_ms`; the best of them wins.

    `seed_population` archs (within the budget) are evaluated first, so a seeded random search
    is a fair baseline for a seeded evolution.
    """
    if batch_size < 1:
        raise HwnasError(f"batch_size must be >= 1, got {batch_size}")
    feasible = check_budget(space, latency_model, budget_ms, seed=seed)
    state = SearchState(space, evaluator, latency_model, budget_ms, queries=queries, seed=seed, strategy="random",
                        progress=progress, max_tries=max_tries, costs=costs,
                        time_limit_s=time_limit_s)
    archs, lat, acc = state.initial(min(batch_size, queries), seed_population, feasible_only=True)
    state.log(0, acc, lat, len(archs))
    stop = "query budget spent"
    generation = 0
    while state.remaining > 0:
        if state.out_of_time:
            stop = "time limit reached"
            break
        generation += 1
        archs, lat, _ = state.propose(min(batch_size, state.remaining),
                                      lambda m: ([space.sample(state.rng) for _ in range(m)], None),
                                      feasible_only=True)
        if not archs:
            stop = f"no new arch within the budget in {max_tries} draws per arch (space exhausted near the budget?)"
            break
        acc = state.record(archs, lat, generation)
        state.log(generation, acc, lat, len(archs))
    return state.finish(stop, {"feasible_range_ms": [feasible.low_ms, feasible.high_ms],
                               "range_exact": feasible.exact, "batch_size": batch_size,
                               "mean_feasible_rate": _rate(state)})


def _rate(state: SearchState) -> float:
    """Share of fresh draws that met the budget: how tight the budget is for uniform sampling."""
    kept = len(state.archs)
    return float(kept / max(kept + state.rejected, 1)) if kept else float(np.nan)
