"""The bookkeeping every searcher shares: what was evaluated, the query budget, proposals, the progress bar.

Deduplication is by the arch itself (hashable), so an arch is never paid for twice; offspring
are proposed in batches and scored with one `predict_many` / `evaluate_many` call per batch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from hwnas.errors import BudgetError, HwnasError
from hwnas.search.protocols import (
    AccuracyEvaluator,
    LatencyModel,
    SearchSpaceLike,
    evaluate_accuracies,
    predict_latencies,
)
from hwnas.search.result import SearchResult, build_result
from hwnas.search.variation import Breeder


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
