"""Re-score a predictor-driven search's most promising candidates with a trusted evaluator, and choose by it.

A predictor ranks 10,000 candidates in a second but is only as good as its rank correlation; the
supernet is trusted but costs a second per arch. `confirm` spends a few supernet evaluations
where the answer is decided (the best predicted archs within the budget, then front members spread
over the latency range) and picks the best by the trusted score.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from hwnas.errors import HwnasError
from hwnas.search.protocols import AccuracyEvaluator, LatencyModel, evaluate_accuracies
from hwnas.search.result import SearchResult, front_of, pick_best


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
