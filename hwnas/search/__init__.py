"""Searchers under a latency budget, evaluators and Pareto tools.

Every searcher has one signature, `(space, evaluator, latency_model, budget_ms, *, queries, seed,
seed_population, progress, ...) -> SearchResult`, and is found by name in `STRATEGIES`, which
`hwnas search --strategy` dispatches on; a new strategy is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hwnas.errors import HwnasError
from hwnas.search.budget import FeasibleRange, check_budget, feasible_range
from hwnas.search.confirm import confirm
from hwnas.search.evolution import evolution_search
from hwnas.search.nsga import nsga_search
from hwnas.search.pareto import hypervolume, non_dominated_sort, pareto_mask
from hwnas.search.protocols import (
    AccuracyEvaluator,
    ArchLike,
    EncodableSpace,
    FunctionEvaluator,
    GeneCodecLike,
    LatencyModel,
    SearchSpaceLike,
    SupernetScoring,
)
from hwnas.search.random import random_search
from hwnas.search.result import SearchResult

Searcher = Callable[..., SearchResult]


def differentiable_search(space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                          budget_ms: float, **options: Any) -> SearchResult:
    """`hwnas.search.differentiable.differentiable_search`, imported on first use (it needs torch)."""
    from hwnas.search.differentiable import differentiable_search as run

    return run(space, evaluator, latency_model, budget_ms, **options)

STRATEGIES: dict[str, Searcher] = {
    "differentiable": differentiable_search,
    "evolution": evolution_search,
    "nsga": nsga_search,
    "random": random_search,
}


def get_strategy(name: str) -> Searcher:
    """The searcher registered as `name`; an unknown name is a one-line error listing the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise HwnasError(f"unknown search strategy '{name}'; known: {', '.join(sorted(STRATEGIES))}") from None


def search(strategy: str, space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
           budget_ms: float, **options: Any) -> SearchResult:
    """Run the searcher registered as `strategy` with the common arguments and its own `options`."""
    return get_strategy(strategy)(space, evaluator, latency_model, budget_ms, **options)


__all__ = [
    "AccuracyEvaluator", "ArchLike", "EncodableSpace", "FeasibleRange", "FunctionEvaluator", "GeneCodecLike",
    "LatencyModel", "STRATEGIES", "SearchResult", "SearchSpaceLike", "SupernetScoring", "check_budget", "confirm",
    "differentiable_search", "evolution_search", "feasible_range", "get_strategy", "hypervolume",
    "non_dominated_sort", "nsga_search", "pareto_mask", "random_search", "search",
]
