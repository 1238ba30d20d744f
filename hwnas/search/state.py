"""The bookkeeping every searcher shares: what was evaluated, the query budget, proposals, the progress bar.

Deduplication is by the arch itself (hashable), so an arch is never paid for twice; offspring
are proposed in batches and scored with one `predict_many` / `evaluate_many` call per batch.
"""

from __future__ import annotations

import math
import sys
import time
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

# Generations in a row that find fewer than one new arch in `max_tries` proposals before a search stops (drying up).
DRY_GENERATIONS = 2
# Random draws per member of an initial population before the rest are repaired instead (see `SearchState.initial`).
SAMPLE_TRIES = 5


def walk_down(space: SearchSpaceLike, model: LatencyModel, budget_ms: float, rng: np.random.Generator,
              steps: int = 50) -> tuple[Any, float]:
    """From the smallest arch, each step the fastest of 32 mutations, until within `budget_ms` (at most `steps`):
    the arch reached and its predicted latency, within the budget or not (the caller decides)."""
    current = space.smallest()
    best = float(predict_latencies(model, [current])[0])
    for _ in range(steps):
        if best <= budget_ms:
            break
        moves = [space.mutate(current, rng, 0.1) for _ in range(32)]
        lat = predict_latencies(model, moves)
        i = int(np.argmin(lat))
        if lat[i] < best:
            current, best = moves[i], float(lat[i])
    return current, best


class SearchState:
    """The bookkeeping every searcher shares: what was evaluated, the query budget, the progress bar.

    Deduplication is by the arch itself (hashable), so an arch is never paid for twice; offspring
    are proposed in batches and scored with one `predict_many` / `evaluate_many` call per batch.
    """

    def __init__(self, space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                 budget_ms: float | None, *, queries: int, seed: int, strategy: str, progress: bool = False,
                 max_tries: int = 50, costs: bool = True, time_limit_s: float | None = None) -> None:
        if queries < 1:
            raise HwnasError(f"queries must be >= 1, got {queries}")
        if max_tries < 1:
            raise HwnasError(f"max_tries must be >= 1, got {max_tries}")
        self.space, self.evaluator, self.latency_model = space, evaluator, latency_model
        self.budget_ms = None if budget_ms is None else float(budget_ms)
        self.queries, self.seed, self.strategy, self.max_tries = int(queries), int(seed), strategy, int(max_tries)
        self.rng = np.random.default_rng(seed)
        self.costs = costs
        if time_limit_s is not None and time_limit_s <= 0:
            raise HwnasError(f"time_limit_s must be positive, got {time_limit_s}")
        self.deadline = None if time_limit_s is None else time.monotonic() + float(time_limit_s)
        self.last_proposals = self.last_found = self.dry_generations = 0
        self.pending: set[Any] = set()  # proposed but not yet recorded (the initial population's parts)
        self.best_feasible = -math.inf  # the best finite accuracy recorded within the budget
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

    def early_stop(self, patience: int | None) -> str | None:
        """Why a generational search stops before its next generation (time limit, patience), or None."""
        if self.out_of_time:
            return "time limit reached"
        if self.stalled(patience):
            return f"stalled: no better arch within the budget in {patience} generations"
        return None

    def stalled(self, patience: int | None) -> bool:
        """No better arch within the budget in the last `patience` generations (None: never stalls)."""
        if patience is None or len(self.history) <= patience:
            return False
        best = [row["best_feasible_accuracy"] for row in self.history]
        before = np.nanmax(best[:-patience]) if np.isfinite(best[:-patience]).any() else -np.inf
        after = np.nanmax(best[-patience:]) if np.isfinite(best[-patience:]).any() else -np.inf
        return not after > before

    @property
    def out_of_time(self) -> bool:
        """Past the time limit: the loop stops at its next generation (what was found is kept)."""
        return self.deadline is not None and time.monotonic() > self.deadline

    def feasible(self, latency: float) -> bool:
        return self.budget_ms is None or latency <= self.budget_ms

    def propose(self, n: int, make_batch: Callable[[int], tuple[list[Any], np.ndarray | None]], *,
                feasible_only: bool, repair: Breeder | None = None, tries: int | None = None,
                price_rows: Callable[[np.ndarray], np.ndarray] | None = None,
                ) -> tuple[list[Any], np.ndarray, np.ndarray | None]:
        """Up to `n` new archs from `make_batch(m)`, not evaluated before, within the budget if `feasible_only`.

        `make_batch` returns m archs and, optionally, their gene rows (kept for the accepted ones).
        Archs over the budget go to `repair` (a `Breeder`) when given, else are dropped. At most
        `max_tries * n` proposals: a budget that few archs meet, or a space that is exhausted,
        ends with fewer archs instead of a loop without end (`tries` per arch instead of `max_tries`).
        `price_rows` (a `Breeder.screen`: exact for a model that adds block costs) prices a batch
        from its gene rows instead of the model's `predict_many`; the arch a search returns is
        re-checked with the model's `predict` either way (`hwnas.search.result.pick_best`).
        """
        out: list[Any] = []
        lats: list[float] = []
        rows: list[np.ndarray] = []
        taken: set[Any] = set(self.pending)
        limit = (self.max_tries if tries is None else tries) * n
        tries = 0
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
            if price_rows is not None and genes is not None:
                lat = price_rows(genes[fresh]) if fresh else np.zeros(0)
            else:
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
        self.last_proposals, self.last_found = tries, len(out)
        genes_out = np.concatenate(rows) if rows else None
        return out, np.asarray(lats, dtype=np.float64), genes_out

    def drying_up(self) -> bool:
        """The last `propose` needed more than `max_tries` proposals per new arch: twice in a row (see `dry`), the
        archs within the budget are all but exhausted (a budget near the fastest arch), and every further
        generation costs the full `max_tries` per child to find a handful."""
        dry = self.last_found == 0 or self.last_proposals > self.max_tries * self.last_found
        self.dry_generations = self.dry_generations + 1 if dry else 0
        return self.dry_generations >= DRY_GENERATIONS

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
        lat = np.asarray(latency[:len(archs)], dtype=np.float64)
        ok = np.isfinite(acc) & (lat <= self.budget_ms if self.budget_ms is not None else True)
        if ok.any():
            self.best_feasible = max(self.best_feasible, float(acc[ok].max()))
        if self.bar is not None:
            self.bar.update(len(archs))
        return acc

    def log(self, generation: int, population_acc: np.ndarray, population_lat: np.ndarray, children: int,
            **extra: Any) -> None:
        """One history row: the population's quality after `generation`."""
        row = {
            "generation": generation, "queries": len(self.archs), "children": children, "rejected": self.rejected,
            "mean_accuracy": float(np.mean(population_acc)) if len(population_acc) else math.nan,
            "std_accuracy": float(np.std(population_acc)) if len(population_acc) else math.nan,
            "best_accuracy": float(np.max(population_acc)) if len(population_acc) else math.nan,
            "mean_latency_ms": float(np.mean(population_lat)) if len(population_lat) else math.nan,
            # kept as archs are recorded: recomputing it over every candidate each generation made a 500-generation
            # search quadratic (a third of its time at 50k candidates)
            "best_feasible_accuracy": self.best_feasible if math.isfinite(self.best_feasible) else math.nan,
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
                generation: int = 0, repair: Breeder | None = None) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """The first population: seeds, then random samples; within budget when `feasible_only`.

        Random samples over the budget are drawn again, up to `SAMPLE_TRIES` per member (the
        population stays a uniform sample of the feasible archs where they are common); the rest
        come from `repair` (a `Breeder`) where given: near the fastest arch almost no sample fits,
        and rejection sampling alone took most of such a search's time. With a budget, at least
        one member is within it: if neither finds one, a descent on latency from the smallest arch
        supplies one.
        """
        n = min(n, self.remaining)
        archs, lat = self.seeds(seed_population, feasible_only=feasible_only)
        archs, lat = archs[:n], lat[:n]
        self.seeded = len(archs)

        def samples(m: int) -> tuple[list[Any], None]:
            return [self.space.sample(self.rng) for _ in range(m)], None

        if len(archs) < n:
            more, more_lat, _ = self.propose(n - len(archs), samples, feasible_only=feasible_only,
                                             tries=SAMPLE_TRIES if repair is not None else None)
            archs, lat = archs + more, np.concatenate([lat, more_lat])
        if len(archs) < n and repair is not None and feasible_only:
            self.pending = set(archs)
            more, more_lat, _ = self.propose(n - len(archs), samples, feasible_only=True, repair=repair)
            self.pending = set()
            archs, lat = archs + more, np.concatenate([lat, more_lat])
        if self.budget_ms is not None and not (lat <= self.budget_ms).any():
            fast, fast_lat = self.descend()
            archs, lat = archs[:n - 1] + fast, np.concatenate([lat[:n - 1], fast_lat])
        acc = self.record(archs, lat, generation)
        return archs, lat, acc

    def descend(self) -> tuple[list[Any], np.ndarray]:
        """Find one arch within the budget by walking down in latency from the smallest arch."""
        assert self.budget_ms is not None
        current, best = walk_down(self.space, self.latency_model, self.budget_ms, self.rng, self.max_tries)
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
