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

from hwnas.errors import HwnasError
from hwnas.search.protocols import LatencyModel, SearchSpaceLike, gene_codec_of, predict_latencies

# How a child over the budget is mended: the slowest of its feasible variants (the best archs of most spaces sit
# just under the budget), or any one of them at random (an optimum well under the budget stays reachable).
REPAIR_PICKS = ("slowest", "random")


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
                 latency_model: LatencyModel | None = None, budget_ms: float | None = None,
                 repair_pick: str = "slowest") -> None:
        self.space, self.rng = space, rng
        self.mutation_prob, self.crossover_prob = mutation_prob, crossover_prob
        self.remutations, self.repair_tries = remutations, repair_tries
        if repair_pick not in REPAIR_PICKS:
            raise HwnasError(f"repair_pick must be one of {', '.join(REPAIR_PICKS)}, got {repair_pick!r}")
        self.repair_pick = repair_pick
        self.codec = gene_codec_of(space) if vectorised else None
        self.budget_ms = budget_ms
        self.screen: Callable[[np.ndarray], np.ndarray] | None = None
        pricer = getattr(self.codec, "row_pricer", None)
        if callable(pricer) and latency_model is not None:
            self.screen = _checked(pricer(latency_model), self.codec, space, latency_model)

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
        """Children over the budget, mended: of `repair_tries` mutations and as many shrinks of each, one new
        variant within the budget (the slowest, or one at random: `repair_pick`).

        Latency predictions are cheap and accuracy evaluations are not, so an over-budget child is
        worth a few more variants rather than a discarded proposal. A shrink takes each gene from the
        space's smallest arch with a probability that grows from variant to variant (the last one is
        the smallest arch itself), so a child always has a feasible variant however tight the budget:
        near the fastest subnet, random mutations of a child almost never fit, and rejecting them
        made such searches many times slower than at a median budget. Variants in any of the `known`
        sets do not count; archs no variant can mend are dropped. Returns the mended archs, their gene
        rows and their `predict_many` latency.
        """
        t = self.repair_tries
        if t < 1 or len(archs) == 0:
            return [], None, np.zeros(0)
        rng, prob, n = self.rng, self.mutation_prob, len(archs)
        k = 2 * t  # variants per child: t mutations, then t shrinks

        def new(arch: Any) -> bool:
            return not any(arch in s for s in known)

        def choose(price: np.ndarray, ok: np.ndarray) -> np.ndarray:
            """Per child, the variants in the order they are tried: feasible ones first, by `repair_pick`."""
            key = np.where(ok, price if self.repair_pick == "slowest" else rng.random(price.shape), -np.inf)
            return np.argsort(-key, axis=1, kind="stable")

        if self.codec is not None and genes is None:
            genes = self.codec.genes(archs, rng)
        if self.codec is not None and genes is not None:
            smallest = self.codec.genes([self.space.smallest()], rng)[0]
            levels = np.repeat(((np.arange(t) + 1) / t)[None, :], n, axis=0).reshape(-1, 1)
            shrinks = np.where(rng.random((n * t, genes.shape[1])) < levels, smallest, np.repeat(genes, t, axis=0))
            mutations = self.codec.mutate(np.repeat(genes, t, axis=0), rng, prob)
            rows = np.concatenate([mutations.reshape(n, t, -1), shrinks.reshape(n, t, -1)], axis=1).reshape(n * k, -1)
            if self.screen is not None:
                est = self.screen(rows).reshape(n, k)
                ok = est <= budget_ms
                order = choose(est, ok)
                rank = np.zeros(n, dtype=np.int64)
                picked: dict[Any, int] = {}
                pending = np.flatnonzero(ok[np.arange(n), order[:, 0]])
                while len(pending):  # each child's next feasible variant, the batch decoded at once
                    rows_at = pending * k + order[pending, rank[pending]]
                    retry = []
                    for i, r, arch in zip(pending.tolist(), rows_at.tolist(), self.codec.decode(rows[rows_at]),
                                          strict=True):
                        if new(arch) and arch not in picked:
                            picked[arch] = r
                            continue
                        rank[i] += 1
                        if rank[i] < k and ok[i, order[i, rank[i]]]:
                            retry.append(i)
                    pending = np.asarray(retry, dtype=np.int64)
                mended = list(picked)
                at = [picked[a] for a in mended]
                return mended, rows[at], est.reshape(-1)[at]  # priced by the screen, exact for an additive model
            variants = self.codec.decode(rows)
        else:
            rows = None
            smallest_arch = self.space.smallest()
            variants = []
            for a in archs:
                variants.extend(self.space.mutate(a, rng, prob) for _ in range(t))
                shrink = a
                for _ in range(t):  # each a crossover with the smallest arch: about half the genes more from it
                    shrink = self.space.crossover(shrink, smallest_arch, rng)
                    variants.append(shrink)
        lat = predict_latencies(latency_model, variants)
        ok = (lat <= budget_ms) & np.fromiter((new(v) for v in variants), dtype=bool, count=len(variants))
        order = choose(lat.reshape(n, k), ok.reshape(n, k))
        picks = [i * k + int(order[i, 0]) for i in range(n) if ok[i * k + int(order[i, 0])]]
        picks = list({variants[p]: p for p in picks}.values())  # two children may mend to one arch
        return [variants[p] for p in picks], None if rows is None else rows[picks], lat[picks]


def _checked(screen: Callable[[np.ndarray], np.ndarray] | None, codec: Any, space: SearchSpaceLike,
             model: LatencyModel) -> Callable[[np.ndarray], np.ndarray] | None:
    """`screen` if it prices a few rows (the smallest and largest arch, six at random) as the model predicts them,
    else None: a model with `block_cost` whose predictions are not their sum is priced by `predict_many` alone."""
    if screen is None:
        return None
    rng = np.random.default_rng(0)
    rows = np.concatenate([codec.genes([space.smallest(), space.largest()], rng), codec.random(6, rng)])
    predicted = predict_latencies(model, codec.decode(rows))
    err = np.abs(screen(rows) - predicted) / np.maximum(np.abs(predicted), 1e-12)
    return screen if float(err.max()) <= 1e-6 else None

