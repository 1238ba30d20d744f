"""Children of a population: mutation and crossover, batched on gene rows where the space offers a codec.

Latency predictions are cheap and accuracy evaluations are not, so a child over the budget is
worth a few more mutations (`Breeder.repair`) rather than a discarded proposal, and with a codec
that prices rows (`row_pricer`, for a latency model that adds up block costs) an over-budget child
is screened from its genes before it is ever built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hwnas.search.protocols import LatencyModel, SearchSpaceLike, gene_codec_of, predict_latencies


class Breeder:
    """Children of a population: through the space's own `mutate` / `crossover` (any `SearchSpaceLike`),
    or a whole batch at once through the space's gene codec where it has one (`hwnas.genes`, the hot
    path of a 50k-candidate search).

    A child is a crossover of two parents (with probability `crossover_prob`) or a mutation of
    its first parent. A child that was evaluated before is mutated again (up to `remutations`
    times): once a population has converged, its one-step neighbours are all known, and walking
    one more step finds new archs (two-gene moves, which a budget-bound optimum often needs)
    instead of proposing known ones until the tries run out. With `budget_ms` and a latency
    model the codec can price rows for (`row_pricer`: `hwnas.genes.SlotLatency` for a model with
    `block_cost`, such as a `LatencyTable`), gene rows are screened first: a child over the budget
    comes back as None (with its genes) for `repair`, undecoded.
    """

    def __init__(self, space: SearchSpaceLike, rng: np.random.Generator, *, mutation_prob: float,
                 crossover_prob: float, vectorised: bool = True, remutations: int = 3, repair_tries: int = 8,
                 latency_model: LatencyModel | None = None, budget_ms: float | None = None) -> None:
        self.space, self.rng = space, rng
        self.mutation_prob, self.crossover_prob = mutation_prob, crossover_prob
        self.remutations, self.repair_tries = remutations, repair_tries
        self.codec = gene_codec_of(space) if vectorised else None
        self.budget_ms = budget_ms
        self.screen: Callable[[np.ndarray], np.ndarray] | None = None
        pricer = getattr(self.codec, "row_pricer", None)
        if callable(pricer) and latency_model is not None:
            self.screen = pricer(latency_model)

    def genes(self, archs: Sequence[Any]) -> np.ndarray | None:
        return None if self.codec is None else self.codec.genes(archs, self.rng)

    def batches(self, archs: Sequence[Any], genes: np.ndarray | None, pick: Callable[[int], np.ndarray],
                seen: set[Any]) -> Callable[[int], tuple[list[Any], np.ndarray | None]]:
        """`make_batch(n)` for `SearchState.propose`: n children of parents chosen by `pick(n)`."""

        def make_batch(n: int) -> tuple[list[Any], np.ndarray | None]:
            return self.breed(archs, genes, pick(n), pick(n), seen)

        return make_batch

    def _over(self, rows: np.ndarray) -> np.ndarray:
        """Rows that the screen prices over the budget (with a hair of slack for summation order)."""
        if self.screen is None or self.budget_ms is None:
            return np.zeros(len(rows), dtype=bool)
        return self.screen(rows) > self.budget_ms * (1 + 1e-9)

    def breed(self, archs: Sequence[Any], genes: np.ndarray | None, first: np.ndarray, second: np.ndarray,
              seen: set[Any]) -> tuple[list[Any], np.ndarray | None]:
        """One child per (first, second) pair of population indices; None for a child screened out."""
        rng, space, prob = self.rng, self.space, self.mutation_prob
        cross = rng.random(len(first)) < self.crossover_prob
        if self.codec is None or genes is None:
            kids = []
            for i, j, c in zip(first.tolist(), second.tolist(), cross.tolist(), strict=True):
                kid = space.crossover(archs[i], archs[j], rng) if c and i != j else space.mutate(archs[i], rng, prob)
                for _ in range(self.remutations):
                    if kid not in seen:
                        break
                    kid = space.mutate(kid, rng, prob)
                kids.append(kid)
            return kids, None
        codec = self.codec
        g1 = genes[first]
        child = np.where(cross[:, None], codec.crossover(g1, genes[second], rng), codec.mutate(g1, rng, prob))
        keep = np.flatnonzero(~self._over(child))
        kids_list: list[Any] = [None] * len(child)
        for i, kid in zip(keep.tolist(), codec.decode(child[keep]), strict=True):
            kids_list[i] = kid
        for _ in range(self.remutations):
            again = [i for i in keep.tolist() if kids_list[i] in seen]
            if not again:
                break
            child[again] = codec.mutate(child[again], rng, prob)
            for i, kid in zip(again, codec.decode(child[again]), strict=True):
                kids_list[i] = kid
        return kids_list, child

    def repair(self, archs: Sequence[Any], genes: np.ndarray | None, latency_model: LatencyModel, budget_ms: float,
               known: Sequence[set[Any]] = ()) -> tuple[list[Any], np.ndarray | None, np.ndarray]:
        """Children over the budget, mended: of `repair_tries` mutations of each, the slowest new one within it.

        Latency predictions are cheap and accuracy evaluations are not, so an over-budget child is
        worth a few more mutations rather than a discarded proposal. The slowest feasible variant
        is kept because accuracy rises with latency in every NAS space: the best archs sit just
        under the budget. Variants in any of the `known` sets do not count; archs no variant can
        mend are dropped. Returns the mended archs, their gene rows and their `predict_many` latency.
        """
        t = self.repair_tries
        if t < 1 or len(archs) == 0:
            return [], None, np.zeros(0)
        rng, prob = self.rng, self.mutation_prob

        def new(arch: Any) -> bool:
            return not any(arch in k for k in known)

        if self.codec is not None and genes is not None:
            rows = self.codec.mutate(np.repeat(genes, t, axis=0), rng, prob)
            if self.screen is not None:
                est = self.screen(rows).reshape(len(genes), t)
                order = np.argsort(-np.where(est <= budget_ms, est, -np.inf), axis=1)
                picked: dict[Any, int] = {}
                for i in range(len(genes)):
                    for j in order[i].tolist():
                        if est[i, j] > budget_ms:
                            break
                        arch = self.codec.decode(rows[i * t + j:i * t + j + 1])[0]
                        if new(arch) and arch not in picked:
                            picked[arch] = i * t + j
                            break
                mended = list(picked)
                lat = predict_latencies(latency_model, mended)
                ok = np.flatnonzero(lat <= budget_ms)
                return [mended[i] for i in ok], rows[[picked[mended[i]] for i in ok]], lat[ok]
            variants = self.codec.decode(rows)
        else:
            rows = None
            variants = [self.space.mutate(a, rng, prob) for a in archs for _ in range(t)]
        lat = predict_latencies(latency_model, variants)
        ok = (lat <= budget_ms) & np.fromiter((new(v) for v in variants), dtype=bool, count=len(variants))
        score = np.where(ok, lat, -np.inf).reshape(len(archs), t)
        best = np.argmax(score, axis=1)
        picks = [i * t + int(best[i]) for i in range(len(archs)) if np.isfinite(score[i, best[i]])]
        picks = list({variants[p]: p for p in picks}.values())  # two children may mend to one arch
        return [variants[p] for p in picks], None if rows is None else rows[picks], lat[picks]
