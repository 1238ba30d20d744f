"""The latency budget as a hard constraint: the feasible range of a space, and a budget refused before any search.

A budget that no arch can meet is a `BudgetError` stating the feasible range (Once-for-All's
evolution loops forever on one). The range is exact when the latency model computes it
(`latency_range`, as a `LatencyTable` does), else a bounded estimate from sampled archs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hwnas.errors import BudgetError
from hwnas.search.protocols import LatencyModel, SearchSpaceLike, as_generator, predict_latencies


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
    rng = as_generator(seed)
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
