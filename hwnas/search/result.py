"""What a search returns: every candidate it evaluated, the accuracy-latency front and the best arch in budget.

A returned best arch is re-checked with the latency model's own `predict`, so no rounding in a
batched sum can put it over the budget (`pick_best`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hwnas.search.pareto import pareto_mask
from hwnas.search.protocols import LatencyModel, SearchSpaceLike

# Columns of `SearchResult.candidates`, in the order they are written to candidates.csv.
COLUMNS = ("arch_id", "latency_ms", "accuracy", "flops", "params", "generation", "feasible", "arch")


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


def build_result(space: SearchSpaceLike, archs: Sequence[Any], latency: Sequence[float], accuracy: Sequence[float],
                 generation: Sequence[int], *, budget_ms: float | None, latency_model: LatencyModel | None,
                 strategy: str, seed: int, history: Sequence[dict[str, Any]], stop_reason: str,
                 info: dict[str, Any] | None = None, costs: bool = True) -> SearchResult:
    """Assemble a `SearchResult` from a searcher's parallel lists of evaluated archs.

    FLOPs and parameters come from the space's `flops_params` where it has one; `costs=False`
    leaves them empty: counting them costs torch's flop counter about 10 ms per distinct block the
    first time a process meets it (seconds for a whole space).
    """
    n = len(archs)
    lat = np.asarray(latency, dtype=np.float64)
    arch_costs = getattr(space, "flops_params", None) if costs else None
    if callable(arch_costs) and n:
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
