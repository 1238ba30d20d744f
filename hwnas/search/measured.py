"""The last step of a search on the target itself: time the best candidates and keep one that meets the budget.

A table within +-5 % on random subnets is less exact where a search stops. The search prefers the
most accurate arch the table calls feasible, and among archs near the budget those the table
under-predicts look cheapest, so the pick is biased towards them (the winner's curse): on the
development VM the archs 15 searches picked ran a median 10 % over the table's prediction, 6 % once
the device's drift was taken out, where the table's validation subnets ran 2 % off (MAPE). When the
search runs on the device it deploys to, timing a handful of the top candidates costs seconds and
takes that bias out of the choice; the timing's own noise remains, which `--margin` is for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.search.result import SearchResult

MEASURED_COLUMN = "measured_ms"


def measured_pick(result: SearchResult, measure: Callable[[list[Any]], list[float]], budget_ms: float, *,
                  top_k: int = 5) -> SearchResult:
    """Time the `top_k` most accurate in-budget candidates together and keep the most accurate timed within budget.

    `measure` times a list of archs at once (interleaved, so that a burst of load does not single
    one out). The candidates gain a `measured_ms` column (NaN where not timed) and
    `info["measured_pick"]` says what happened. When none of them meets the budget as timed, the
    fastest is kept and `info["measured_pick"]["met_budget"]` is False: the caller warns, since
    the table is then too optimistic for this device as it runs now (see `hwnas latency drift`).
    """
    if top_k < 1:
        raise HwnasError(f"measured_pick needs top_k >= 1, got {top_k}")
    metric = result.metric
    cand = result.candidates
    rows = cand[cand[metric].notna() & (cand["latency_ms"] <= budget_ms)]
    rows = rows.sort_values([metric, "latency_ms"], ascending=[False, True], kind="stable").head(top_k)
    if rows.empty:
        return result
    ids = list(rows["arch_id"])
    times = [float(t) for t in measure([result.archs[i] for i in ids])]
    if len(times) != len(ids):
        raise HwnasError(f"measure returned {len(times)} timings for {len(ids)} archs")
    timed = dict(zip(ids, times, strict=True))
    within = [i for i in ids if timed[i] <= budget_ms]
    arch_id = within[0] if within else min(ids, key=timed.__getitem__)
    candidates = cand.copy()
    measured = candidates["arch_id"].map(timed).astype(np.float64)
    if MEASURED_COLUMN in candidates:
        measured = measured.fillna(candidates[MEASURED_COLUMN])
    candidates[MEASURED_COLUMN] = measured
    best_row = candidates[candidates["arch_id"] == arch_id].iloc[0]
    info = {**result.info, "measured_pick": {
        "top_k": top_k, "timed": len(ids), "picked_rank": ids.index(arch_id), "met_budget": bool(within),
        "measured_ms": timed[arch_id], "predicted_ms": float(best_row["latency_ms"]), "table_best": ids[0],
    }}
    return replace(result, candidates=candidates, best=result.archs[arch_id], best_row=best_row, info=info)


def describe_pick(result: SearchResult) -> str:
    """One line on what `measured_pick` timed and kept."""
    info = result.info["measured_pick"]
    kept = "none" if result.best_row is None else result.best_row["arch_id"]
    how = "the most accurate" if info["picked_rank"] == 0 else f"number {info['picked_rank'] + 1} by accuracy"
    line = (f"timed the top {info['timed']} in-budget candidates on this device: kept {kept}, "
            f"{how}, {info['measured_ms']:.4g} ms timed vs {info['predicted_ms']:.4g} ms predicted")
    if not info["met_budget"]:
        line += (f"; NONE of them met {result.budget_ms:g} ms as timed, the fastest was kept (check "
                 "'hwnas latency drift', or search with --drift correct)")
    return line
