"""Differentiable search under a hard latency budget: a learned distribution over the space's choices.

The architecture parameters are logits of independent categoricals, one per elastic choice of an
`hwnas.SearchSpace`: the resolution, the depth of each stage, and the kernel and expand ratio of
every block slot (a slot beyond its stage's depth is latent: it changes nothing until the depth
grows). Each step samples single paths (whole discrete archs) from the distribution and moves the
logits along the gradient of the Lagrangian

    L(theta, lambda) = -E_theta[reward(arch)] + lambda * (E_theta[latency(arch)] / budget - 1)

with Adam, then raises or lowers the multiplier by dual ascent, `lambda <- max(0, lambda + dual_lr *
(E[latency] / budget - 1))`: nobody tunes a latency weight, the budget sets it.

Why the score-function gradient for the reward. The supernet runs one discrete active arch
(`Supernet.set_active`: kernels cropped, channels sliced, blocks skipped); no relaxed one-hot
multiplies any of its ops, and an `AccuracyEvaluator` is a black box. Gumbel-softmax
straight-through would need the network's output to be a differentiable function of the sampled
one-hots; a "multiply the block output by its one-hot" trick (DSNAS) does not cover a skipped
block or a cropped kernel without changing the supernet. The score-function (REINFORCE) estimator,
`E[(r - b) * grad log p(arch)]`, is unbiased for any reward, needs nothing but samples, and works
with every evaluator. Its variance is kept low by (1) a moving-average baseline `b` with the
advantage divided by a moving standard deviation (so the step does not depend on whether accuracy
is in percent or a fraction), (2) log-probabilities over the *active* choices only (a latent slot
does not change the reward; its score only adds noise), and (3) with `reward="batch"`, common
random numbers: every arch sampled in a step is scored on the same batch.

The latency term has no variance at all: for a table whose prediction is `intercept + sum of
block_cost(block)` (every calibration `LatencyTable` fits is affine in the measured block times:
'none', 'scale', 'linear', 'linear+blocks', 'per-kind'), the expectation is exact by linearity.
A block's cost depends only on (resolution, stage, slot, kernel, expand) (`SlotLatency`), slot
`i` of stage `s` is present when the stage's depth exceeds `i`, and the choices are independent, so

    E[latency] = intercept + sum_r P(r) * (fixed(r)
                 + sum_{s,i} P(depth_s > i) * sum_{k,e} P(kernel_si = k) P(expand_si = e) cost(r, s, i, k, e))

which is what `ExpectedLatency.exact` computes as a differentiable function of the logits, in the
same calibrated milliseconds as `LatencyTable.predict`. The additivity is checked against
`predict` on a few archs; a model with `block_cost` whose predictions are not additive is an error
rather than a silently wrong expectation. A latency model with `predict` only (no block costs) gets
a Monte-Carlo estimate instead (`mc_samples` predicted archs per step, score-function gradient
with a leave-one-out baseline), reported as such in `info["latency_expectation"]`.

Rewards. With any evaluator (`reward="evaluator"`, the default), the reward of an arch is its
accuracy from `evaluator.evaluate`; accuracies are cached, so `queries` counts distinct archs, as
for the other strategies. With a `SupernetEvaluator`, `reward="batch"` scores each sampled arch by
the negative cross-entropy of the supernet on a validation batch (batch statistics in BN, the
supernet's running statistics untouched), and `finetune=True` also trains the shared weights on the
sampled paths with SGD on training batches (DSNAS-style joint search). Fine-tuning works on a copy
of the supernet; its state comes back in `SearchResult.supernet_state` (`hwnas search` writes it
to OUT/supernet.pt), and the derived arch is scored with the fine-tuned weights.

The derived arch is the distribution's argmax, repaired on the latency model to the band between
`band * budget` and the budget: while over the budget, the step down (one kernel, expand, depth or
resolution choice to the next smaller value) that costs the least log-probability per millisecond
saved; while under the band, the step up that fits and costs the least log-probability per
millisecond gained (a step up paired with a step down when no single step fits). The learned
log-probability is the search's estimate of what a choice is worth: it is what the reward
gradient raised, net of what the multiplier charged for its latency. The returned arch is checked
with `latency_model.predict` itself: it is never over the budget. With the evaluator's reward,
every arch sampled on the way was scored by the same evaluator as the derived one, so a sampled
arch in the band that scored higher is returned instead (`info["picked"]` says which; the derived
arch and its accuracy stay in `info`): on the synthetic tests the repaired argmax alone lands in
the best few per cent of the feasible archs at most budgets but not at the tightest. A budget below the fastest
subnet is a `BudgetError` with the feasible range, before anything is evaluated.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError
from hwnas.search.base import (
    AccuracyEvaluator,
    GeneCodec,
    LatencyModel,
    SearchResult,
    SearchSpaceLike,
    SlotLatency,
    build_result,
    check_budget,
    evaluate_accuracies,
    predict_latencies,
)

REWARDS = ("evaluator", "batch")
DTYPE = torch.float64


def _draw(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """`n` draws from each row of `probs` (B, C): an (n, B) array of choice indices."""
    cum = np.cumsum(probs, axis=-1)
    cum[:, -1] = 1.0
    u = rng.random((n, probs.shape[0], 1))
    return (cum[None] <= u).sum(axis=-1)


# ---- the distribution -------------------------------------------------------------------------------------
class ArchDistribution:
    """Independent categoricals (torch logits) over the choices of an `hwnas.SearchSpace`.

    Archs are handled as `GeneCodec` rows: resolution, depth per stage, then kernel and expand of
    every slot (stage-major) up to the maximum depth. `log_prob` and `entropy` count the active
    choices only, so they are those of the distribution over distinct networks.
    """

    def __init__(self, space: Any) -> None:
        if not GeneCodec.supports(space):
            raise HwnasError(f"the differentiable strategy needs an hwnas.SearchSpace (its choices are what it "
                             f"learns a distribution over); space '{space.name}' is a {type(space).__name__}")
        self.space = space
        self.codec = codec = GeneCodec(space)
        s, m = codec.stages, codec.depth

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=DTYPE, requires_grad=True)

        self.resolution = zeros(len(codec.res_choices))
        self.depth = zeros(s, len(codec.depth_choices))
        self.kernel = zeros(s, m, len(codec.kernel_choices))
        self.expand = zeros(s, m, len(codec.expand_choices))
        # present[d, i]: slot i of a stage runs when the stage's depth is depth_choices[d]
        self.present = torch.tensor([[float(d > i) for i in range(m)] for d in codec.depth_choices], dtype=DTYPE)

    def parameters(self) -> list[torch.Tensor]:
        return [self.resolution, self.depth, self.kernel, self.expand]

    def probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (F.softmax(self.resolution, -1), F.softmax(self.depth, -1), F.softmax(self.kernel, -1),
                F.softmax(self.expand, -1))

    def init_from(self, archs: Iterable[Any], weight: float = 1.0) -> int:
        """Lean the logits toward `archs` (e.g. an earlier run's front): + weight * log(1 + count) per choice."""
        archs = list(archs)
        if not archs:
            return 0
        genes = self.codec.genes(archs, np.random.default_rng(0))
        codec, s, m = self.codec, self.codec.stages, self.codec.depth
        dep = genes[:, 1:codec.k0]
        active = self.present.numpy()[dep].astype(bool)  # (n, s, m)
        with torch.no_grad():
            self.resolution += weight * torch.log1p(torch.tensor(np.bincount(genes[:, 0], minlength=len(
                codec.res_choices)), dtype=DTYPE))
            for stage in range(s):
                self.depth[stage] += weight * torch.log1p(torch.tensor(np.bincount(
                    dep[:, stage], minlength=len(codec.depth_choices)), dtype=DTYPE))
                for i in range(m):
                    on = active[:, stage, i]
                    for logits, start, size in ((self.kernel, codec.k0, len(codec.kernel_choices)),
                                                (self.expand, codec.e0, len(codec.expand_choices))):
                        counts = np.bincount(genes[on, start + stage * m + i], minlength=size)
                        logits[stage, i] += weight * torch.log1p(torch.tensor(counts, dtype=DTYPE))
        return len(archs)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` gene rows drawn from the distribution (numpy, so a seed repeats them)."""
        with torch.no_grad():
            pr, pd, pk, pe = (p.numpy() for p in self.probs())
        s, m = self.codec.stages, self.codec.depth
        return np.concatenate([
            _draw(rng, pr[None], n), _draw(rng, pd, n),
            _draw(rng, pk.reshape(s * m, -1), n), _draw(rng, pe.reshape(s * m, -1), n)], axis=1)

    def argmax(self) -> np.ndarray:
        """The most probable choice of every categorical, as one gene row (latent slots included)."""
        with torch.no_grad():
            return np.concatenate([self.resolution.argmax(-1).reshape(1), self.depth.argmax(-1).reshape(-1),
                                   self.kernel.argmax(-1).reshape(-1), self.expand.argmax(-1).reshape(-1)]).astype(
                                       np.int64)

    def _log_probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (F.log_softmax(self.resolution, -1), F.log_softmax(self.depth, -1), F.log_softmax(self.kernel, -1),
                F.log_softmax(self.expand, -1))

    def log_prob(self, genes: np.ndarray) -> torch.Tensor:
        """Log-probability of each gene row's network (active choices only), differentiable in the logits."""
        codec, s, m = self.codec, self.codec.stages, self.codec.depth
        g = torch.as_tensor(np.asarray(genes, dtype=np.int64))
        n = g.shape[0]
        lr, ld, lk, le = self._log_probs()
        dep = g[:, 1:codec.k0]
        active = self.present[dep]  # (n, s, m)
        slots = torch.arange(s * m)[None, :]
        kern = lk.reshape(s * m, -1)[slots, g[:, codec.k0:codec.e0]].reshape(n, s, m)
        expd = le.reshape(s * m, -1)[slots, g[:, codec.e0:]].reshape(n, s, m)
        return lr[g[:, 0]] + ld[torch.arange(s)[None, :], dep].sum(1) + ((kern + expd) * active).sum((1, 2))

    def entropy(self) -> torch.Tensor:
        """Entropy (nats) of the distribution over distinct networks: latent slots weighted by their presence."""
        pr, pd, pk, pe = self.probs()
        lr, ld, lk, le = self._log_probs()
        presence = pd @ self.present  # (s, m): P(depth_s > i)
        slot = -(pk * lk).sum(-1) - (pe * le).sum(-1)
        return -(pr * lr).sum() - (pd * ld).sum() + (presence * slot).sum()

    def probability(self, arch: Any) -> float:
        """P(arch) under the distribution (for checks; a search works on gene rows)."""
        genes = self.codec.genes([arch], np.random.default_rng(0))
        with torch.no_grad():
            return float(self.log_prob(genes).exp()[0])

    def decode(self, genes: np.ndarray) -> list[Any]:
        return self.codec.decode(np.asarray(genes, dtype=np.int64).reshape(-1, self.codec.width))


# ---- the expected latency ----------------------------------------------------------------------------------
class ExpectedLatency:
    """E[predicted latency] of an `ArchDistribution`: exact from block costs, else a Monte-Carlo estimate.

    Exact when the model has `block_cost` (a `LatencyTable`) and every stage has at least one block
    (so a block's input size depends on the resolution and its own position only); then `cost`
    (resolution, stage, slot, kernel, expand), `fixed` (stem, first block and head per resolution)
    and `intercept` reproduce `predict` for every arch, which is checked here on a few archs.
    """

    def __init__(self, space: Any, model: LatencyModel, *, mc_samples: int = 64, check: int = 8) -> None:
        self.space, self.model, self.mc_samples = space, model, int(mc_samples)
        self.codec = codec = GeneCodec(space)
        self.slot: SlotLatency | None = None
        if SlotLatency.supports(codec, model) and min(codec.depth_choices) >= 1:
            slot = SlotLatency(codec, model)
            rows = np.concatenate([codec.genes([space.smallest(), space.largest()], np.random.default_rng(0)),
                                   codec.random(check, np.random.default_rng(1))])
            summed, predicted = slot(rows), predict_latencies(model, codec.decode(rows))
            err = float(np.max(np.abs(summed - predicted) / np.maximum(np.abs(predicted), 1e-12)))
            if err > 1e-6:
                raise HwnasError(f"the latency model's predictions are not its intercept plus the sum of its "
                                 f"block_cost values (relative error {err:.2g}): a calibration that is not affine in "
                                 "block costs has no exact expected latency; remove block_cost to use a Monte-Carlo "
                                 "estimate")
            self.slot = slot
            self.cost = torch.as_tensor(slot.cost, dtype=DTYPE)
            self.fixed = torch.as_tensor(slot.fixed, dtype=DTYPE)
            self.intercept = float(slot.intercept)
        elif self.mc_samples < 2:
            raise HwnasError(f"mc_samples must be >= 2, got {mc_samples}")

    @property
    def is_exact(self) -> bool:
        return self.slot is not None

    def exact(self, dist: ArchDistribution) -> torch.Tensor:
        """The exact expectation in calibrated milliseconds, differentiable in the logits."""
        if self.slot is None:
            raise HwnasError("this latency model has no block costs: its expected latency is only estimated")
        pr, pd, pk, pe = dist.probs()
        presence = pd @ dist.present  # (s, m)
        per_slot = torch.einsum("rsmke,smk,sme->rsm", self.cost, pk, pe)
        return self.intercept + pr @ (self.fixed + (per_slot * presence).sum((1, 2)))

    def estimate(self, dist: ArchDistribution, rng: np.random.Generator) -> tuple[float, torch.Tensor]:
        """(value, surrogate): the surrogate's gradient is the gradient of E[latency] (exact, or estimated)."""
        if self.slot is not None:
            value = self.exact(dist)
            return float(value.detach()), value
        n = self.mc_samples
        genes = dist.sample(n, rng)
        lat = predict_latencies(self.model, dist.decode(genes))
        mean = float(lat.mean())
        advantage = torch.as_tensor((lat - mean) * n / (n - 1), dtype=DTYPE)  # leave-one-out baseline
        term = (advantage * dist.log_prob(genes)).mean()
        return mean, mean + term - term.detach()

    def price(self, genes: np.ndarray) -> np.ndarray:
        """Predicted latency of gene rows: from slot costs when exact, else by the model's own predict."""
        genes = np.asarray(genes, dtype=np.int64).reshape(-1, self.codec.width)
        if self.slot is not None:
            return self.slot(genes)
        return predict_latencies(self.model, self.codec.decode(genes))

    def fastest(self) -> np.ndarray | None:
        """The gene row of the fastest arch (exact models only): per resolution, each stage's cheapest prefix."""
        if self.slot is None:
            return None
        slot, codec = self.slot, self.codec
        best: tuple[float, np.ndarray] | None = None
        for r in range(len(codec.res_choices)):
            row = np.zeros(codec.width, dtype=np.int64)
            row[0] = r
            total = float(slot.fixed[r])
            for s in range(codec.stages):
                flat = slot.cost[r, s].reshape(codec.depth, -1)  # (m, k*e)
                cheap = flat.argmin(axis=1)
                prefix = np.cumsum(flat.min(axis=1))
                d = min(range(len(codec.depth_choices)), key=lambda j: prefix[codec.depth_choices[j] - 1])
                row[1 + s] = d
                total += float(prefix[codec.depth_choices[d] - 1])
                k, e = np.unravel_index(cheap, slot.cost.shape[3:])
                row[codec.k0 + s * codec.depth:codec.k0 + (s + 1) * codec.depth] = k
                row[codec.e0 + s * codec.depth:codec.e0 + (s + 1) * codec.depth] = e
            if best is None or total < best[0]:
                best = (total, row)
        assert best is not None
        return best[1]


# ---- the discrete repair -------------------------------------------------------------------------------------
class Repair:
    """Moves a gene row into the band [band * budget, budget] by single choice steps (see the module doc)."""

    def __init__(self, dist: ArchDistribution, latency: ExpectedLatency, budget_ms: float, band: float) -> None:
        self.dist, self.latency, self.budget, self.low = dist, latency, float(budget_ms), float(band) * budget_ms
        codec = dist.codec
        self.codec = codec
        # for each gene column, its choice indices sorted by value: a step up is the next larger value
        orders = [np.argsort(codec.res_choices)] + [np.argsort(codec.depth_choices)] * codec.stages \
            + [np.argsort(codec.kernel_choices)] * (codec.stages * codec.depth) \
            + [np.argsort(codec.expand_choices)] * (codec.stages * codec.depth)
        self.order = orders
        self.rank = [np.argsort(o) for o in orders]
        with torch.no_grad():
            lr, ld, lk, le = (t.numpy() for t in dist._log_probs())
        self.logp = (lr, ld, lk.reshape(codec.stages * codec.depth, -1), le.reshape(codec.stages * codec.depth, -1))
        self.present = dist.present.numpy().astype(bool)

    def log_prob(self, rows: np.ndarray) -> np.ndarray:
        codec, m = self.codec, self.codec.depth
        lr, ld, lk, le = self.logp
        dep = rows[:, 1:codec.k0]
        active = self.present[dep].reshape(len(rows), -1)
        slots = np.arange(codec.stages * m)[None, :]
        blocks = lk[slots, rows[:, codec.k0:codec.e0]] + le[slots, rows[:, codec.e0:]]
        return lr[rows[:, 0]] + ld[np.arange(codec.stages)[None, :], dep].sum(1) + (blocks * active).sum(1)

    def _columns(self, row: np.ndarray) -> list[int]:
        """Gene columns that change the network: resolution, depths, and the active slots."""
        codec, m = self.codec, self.codec.depth
        cols = list(range(codec.k0))
        for s in range(codec.stages):
            depth = codec.depth_choices[row[1 + s]]
            for i in range(depth):
                cols += [codec.k0 + s * m + i, codec.e0 + s * m + i]
        return cols

    def moves(self, row: np.ndarray, direction: int) -> tuple[np.ndarray, list[str]]:
        """Every row one choice step up (+1) or down (-1) from `row`, with a readable name for each."""
        rows, names = [], []
        for col in self._columns(row):
            rank = self.rank[col][row[col]] + direction
            if 0 <= rank < len(self.order[col]):
                new = row.copy()
                new[col] = self.order[col][rank]
                rows.append(new)
                names.append(self._name(col, row[col], new[col]))
        return (np.stack(rows) if rows else np.zeros((0, len(row)), dtype=np.int64)), names

    def _name(self, col: int, old: int, new: int) -> str:
        codec, m = self.codec, self.codec.depth
        if col == 0:
            return f"resolution {codec.res_choices[old]}->{codec.res_choices[new]}"
        if col < codec.k0:
            return f"depth[{col - 1}] {codec.depth_choices[old]}->{codec.depth_choices[new]}"
        if col < codec.e0:
            s, i = divmod(col - codec.k0, m)
            return f"kernel[{s}.{i}] {codec.kernel_choices[old]}->{codec.kernel_choices[new]}"
        s, i = divmod(col - codec.e0, m)
        return f"expand[{s}.{i}] {codec.expand_choices[old]:g}->{codec.expand_choices[new]:g}"

    def __call__(self, row: np.ndarray) -> tuple[np.ndarray, float, list[str]]:
        """The repaired row, its priced latency, and the steps taken."""
        row = np.asarray(row, dtype=np.int64).copy()
        lat = float(self.latency.price(row)[0])
        steps: list[str] = []
        while lat > self.budget:  # shrink: the least log-probability lost per millisecond saved
            rows, names = self.moves(row, -1)
            prices = self.latency.price(rows) if len(rows) else np.zeros(0)
            saved = lat - prices
            ok = saved > 0
            if not ok.any():
                fastest = self.latency.fastest()
                if fastest is None:
                    break
                row, lat = fastest, float(self.latency.price(fastest)[0])
                steps.append("fastest arch")
                break
            score = np.where(ok, (self.log_prob(rows) - self.log_prob(row[None])) / np.where(ok, saved, 1), -np.inf)
            j = int(np.argmax(score))
            row, lat = rows[j], float(prices[j])
            steps.append(names[j])
        while self.budget >= lat and lat < self.low:  # grow: the least log-probability lost per millisecond gained
            picked = None
            for changes in (1, 2, 3):  # single steps first; two or three at once when no single one fits
                rows, names = self.neighbours(row, changes)
                picked = self._best_growth(row, lat, rows, names)
                if picked is not None:
                    break
            if picked is None:
                break
            row, lat, name = picked
            steps.append(name)
        return row, lat, steps

    def neighbours(self, row: np.ndarray, changes: int) -> tuple[np.ndarray, list[str]]:
        """Rows `changes` choice steps from `row` in distinct columns (one step up or down each); 1: up only."""
        up, up_names = self.moves(row, +1)
        if changes == 1:
            return up, up_names
        down, down_names = self.moves(row, -1)
        steps = [(int(np.flatnonzero(r != row)[0]), r, n) for r, n in zip([*up, *down], [*up_names, *down_names],
                                                                        strict=True)]
        rows, names = [], []
        for combo in itertools.combinations(steps, changes):
            if len({col for col, _, _ in combo}) < changes or all(n in down_names for _, _, n in combo):
                continue  # one column twice, or only steps down (never gains latency)
            new = row.copy()
            for col, r, _ in combo:
                new[col] = r[col]
            rows.append(new)
            names.append(" & ".join(n for _, _, n in combo))
        return (np.stack(rows) if rows else np.zeros((0, len(row)), dtype=np.int64)), names

    def _best_growth(self, row: np.ndarray, lat: float, rows: np.ndarray, names: list[str]
                     ) -> tuple[np.ndarray, float, str] | None:
        if len(rows) == 0:
            return None
        prices = self.latency.price(rows)
        gained = prices - lat
        ok = (gained > 0) & (prices <= self.budget)
        if not ok.any():
            return None
        score = np.where(ok, (self.log_prob(rows) - self.log_prob(row[None])) / np.where(ok, gained, 1), -np.inf)
        j = int(np.argmax(score))
        return rows[j], float(prices[j]), names[j]


# ---- supernet batches ----------------------------------------------------------------------------------------
@contextmanager
def _batch_statistics(net: nn.Module) -> Iterator[None]:
    """BN on batch statistics, dropout off, and every BN buffer restored afterwards (scoring, not training)."""
    was_training = net.training
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    net.eval()
    for m in norms:
        m.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
        net.train(was_training)


def _batch(split: Any, batch_size: int, resolution: int, seed: int, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(split.batches(batch_size, resolution=resolution, shuffle=True, seed=seed, device=device,
                                   max_batches=1)))


class _SupernetRewards:
    """Batch rewards (-cross-entropy on a validation batch) and optional joint fine-tuning of a supernet copy."""

    def __init__(self, evaluator: Any, *, finetune: bool, batch_size: int, weight_lr: float, seed: int) -> None:
        from hwnas.search.evaluate import SupernetEvaluator

        if not isinstance(evaluator, SupernetEvaluator):
            raise HwnasError(f"reward='batch' and finetune need a SupernetEvaluator (data and weights); "
                             f"got a {type(evaluator).__name__}")
        self.evaluator, self.finetune = evaluator, finetune
        self.device = evaluator.device
        self.net = copy.deepcopy(evaluator.supernet) if finetune else evaluator.supernet
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=weight_lr, momentum=0.9) if finetune else None
        self.task_loss = math.nan
        self.batch_accuracy = math.nan

    def __call__(self, archs: list[Any], step: int) -> np.ndarray:
        net, seed = self.net, self.seed * 1_000_003 + step
        losses, correct = [], []
        with torch.no_grad(), _batch_statistics(net):
            for arch in archs:
                x, y = _batch(self.evaluator.split, self.batch_size, arch.resolution, seed, self.device)
                out = net.set_active(arch)(x)
                losses.append(float(F.cross_entropy(out, y)))
                correct.append(float((out.argmax(1) == y).float().mean()))
        if self.optimizer is not None:
            net.train()
            self.optimizer.zero_grad(set_to_none=True)
            for arch in archs:
                x, y = _batch(self.evaluator.calibration, self.batch_size, arch.resolution, seed, self.device)
                (F.cross_entropy(net.set_active(arch)(x), y) / len(archs)).backward()
            self.optimizer.step()
            net.eval()
        self.task_loss = float(np.mean(losses))
        self.batch_accuracy = 100.0 * float(np.mean(correct))
        return -np.asarray(losses)

    def final_evaluator(self) -> AccuracyEvaluator:
        """The evaluator of the derived arch: the caller's, or a copy on the fine-tuned weights."""
        if not self.finetune:
            return self.evaluator
        tuned = copy.copy(self.evaluator)
        tuned.supernet = self.net.eval()
        tuned.cache = {}
        tuned.evaluations = 0
        return tuned


# ---- the searcher ------------------------------------------------------------------------------------------------
def differentiable_search(space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                          budget_ms: float, *, queries: int = 1000, steps: int | None = None,
                          samples_per_step: int = 4, lr: float = 0.1, dual_lr: float = 20.0,
                          baseline_decay: float = 0.9, reward: str | None = None, finetune: bool = False,
                          batch_size: int = 128, weight_lr: float = 0.005, band: float = 0.97,
                          mc_samples: int = 64, seed: int = 0, seed_population: Iterable[Any] | None = None,
                          progress: bool = False, costs: bool = True) -> SearchResult:
    """Learn a distribution over the archs of `space` under `budget_ms`; return its repaired argmax.

    `queries` bounds the distinct archs `evaluator` scores (one is kept for the derived arch);
    `steps` bounds the logit updates (default: 10 * queries / samples_per_step with the evaluator's
    reward, 200 with batch rewards), each on `samples_per_step` sampled archs. `lr` is Adam's step
    on the logits, `dual_lr` the multiplier's step per unit of relative budget violation.
    `reward` is "evaluator" (default) or "batch"; `finetune=True` (implies "batch") trains a copy
    of the supernet's shared weights on the sampled paths with SGD at `weight_lr` on batches of
    `batch_size`. `band` is the share of the budget the derived arch is repaired to fill at least
(0: only shrink an argmax over the budget, never grow one under it).
    `seed_population` archs lean the initial logits toward their choices. See the module doc.
    """
    reward = reward if reward is not None else ("batch" if finetune else "evaluator")
    if reward not in REWARDS:
        raise HwnasError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    if finetune and reward != "batch":
        raise HwnasError("finetune=True needs reward='batch' (fine-tuned weights make cached accuracies stale)")
    if queries < 1:
        raise HwnasError(f"queries must be >= 1, got {queries}")
    if samples_per_step < 1:
        raise HwnasError(f"samples_per_step must be >= 1, got {samples_per_step}")
    if not 0 <= band <= 1:
        raise HwnasError(f"band must lie in [0, 1], got {band}")
    if steps is not None and steps < 0:
        raise HwnasError(f"steps must be >= 0, got {steps}")
    dist = ArchDistribution(space)
    feasible = check_budget(space, latency_model, budget_ms, seed=seed)
    budget = float(budget_ms)
    expectation = ExpectedLatency(space, latency_model, mc_samples=mc_samples)
    rewards = _SupernetRewards(evaluator, finetune=finetune, batch_size=batch_size, weight_lr=weight_lr,
                               seed=seed) if reward == "batch" else None
    if steps is None:
        steps = 200 if rewards is not None else max(50, 10 * queries // samples_per_step)
    rng = np.random.default_rng(seed)
    seeds = [space.validate(a) for a in (seed_population or ())]
    seeded = dist.init_from([a for a, lat in zip(seeds, predict_latencies(latency_model, seeds), strict=True)
                             if lat <= budget])
    optimizer = torch.optim.Adam(dist.parameters(), lr=lr)

    archs: list[Any] = []
    lat_of: list[float] = []
    acc_of: list[float] = []
    generation: list[int] = []
    cache: dict[Any, float] = {}
    history: list[dict[str, Any]] = []
    multiplier, baseline, spread = 0.0, math.nan, math.nan
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="search differentiable", unit="step", file=sys.stderr, dynamic_ncols=True)
    stop = f"{steps} steps done"
    reserve = 1  # a query kept for the derived arch
    for step in range(steps):
        genes = dist.sample(samples_per_step, rng)
        sampled = dist.decode(genes)
        if rewards is not None:
            r = rewards(sampled, step)
        else:
            fresh = list(dict.fromkeys(a for a in sampled if a not in cache))
            if len(fresh) > max(queries - reserve - len(archs), 0):
                stop = "query budget spent"  # scoring only the known samples would bias the gradient
                break
            if fresh:
                acc = evaluate_accuracies(evaluator, fresh)
                cache.update(zip(fresh, acc.tolist(), strict=True))
                archs.extend(fresh)
                lat_of.extend(predict_latencies(latency_model, fresh).tolist())
                acc_of.extend(acc.tolist())
                generation.extend([step] * len(fresh))
            r = np.array([cache[a] for a in sampled])
        mean_r = float(r.mean())
        if math.isnan(baseline):
            baseline, spread = mean_r, float(r.var())
        # the spread includes this step's rewards, so an advantage is bounded by sqrt(n / (1 - decay))
        spread = baseline_decay * spread + (1 - baseline_decay) * float(np.mean((r - baseline) ** 2))
        advantage = (r - baseline) / math.sqrt(spread + 1e-12 * (1 + baseline * baseline))
        baseline = baseline_decay * baseline + (1 - baseline_decay) * mean_r

        exp_lat, lat_term = expectation.estimate(dist, rng)
        task = -(torch.as_tensor(advantage, dtype=DTYPE) * dist.log_prob(genes)).mean()
        loss = task + multiplier * lat_term / budget
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        violation = exp_lat / budget - 1
        with torch.no_grad():
            entropy = float(dist.entropy())
        top = dist.argmax()
        history.append({
            "generation": step, "queries": len(archs), "samples": len(sampled),
            "mean_accuracy": rewards.batch_accuracy if rewards is not None else mean_r,
            "task_loss": rewards.task_loss if rewards is not None else -mean_r,
            "expected_latency_ms": exp_lat, "argmax_latency_ms": float(expectation.price(top)[0]),
            "multiplier": multiplier, "entropy": entropy,
            "loss": -mean_r + multiplier * math.sqrt(max(spread, 0.0)) * violation,
        })
        multiplier = max(0.0, multiplier + dual_lr * violation)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(lat=f"{exp_lat:.4g}", lam=f"{multiplier:.3g}", H=f"{entropy:.3g}", refresh=False)
        if entropy < 1e-3:
            stop = f"distribution converged after {step + 1} steps"
            break
    if bar is not None:
        bar.close()

    derived_genes = dist.argmax()
    argmax_lat = float(expectation.price(derived_genes)[0])
    # slot sums and predict may differ in the last bit: repair to a hair under the budget when pricing by slots
    limit = budget * (1 - 1e-9) if expectation.is_exact else budget
    repaired, _, moves = Repair(dist, expectation, limit, band * budget / limit)(derived_genes)
    derived = dist.decode(repaired)[0]
    final_lat = float(latency_model.predict(derived))
    if final_lat > budget:
        raise HwnasError(f"could not repair the derived arch to within {budget:.4g} ms (at {final_lat:.4g} ms)")
    final_eval = rewards.final_evaluator() if rewards is not None else evaluator
    if derived not in cache:
        acc = float(evaluate_accuracies(final_eval, [derived])[0])
        cache[derived] = acc
        archs.append(derived)
        lat_of.append(final_lat)
        acc_of.append(acc)
        generation.append(len(history))
    best = derived
    if rewards is None:
        # every sampled arch was scored by the same evaluator: one in the band that beat the derived arch wins
        in_band = [i for i, lat in enumerate(lat_of) if band * budget <= lat <= budget]
        top = max(in_band, key=lambda i: acc_of[i], default=None)
        if top is not None and acc_of[top] > cache[derived]:
            best = archs[top]
    info: dict[str, Any] = {
        "picked": "derived" if best == derived else "sampled (more accurate than the derived arch, in the band)",
        "derived_arch": derived.to_json(), "derived_accuracy": cache[derived],
        "feasible_range_ms": [feasible.low_ms, feasible.high_ms], "range_exact": feasible.exact,
        "latency_expectation": "exact" if expectation.is_exact else f"monte-carlo ({mc_samples} samples per step)",
        "reward": reward, "finetune": finetune, "steps": len(history), "samples_per_step": samples_per_step,
        "multiplier": multiplier, "entropy": history[-1]["entropy"] if history else float(dist.entropy().detach()),
        "expected_latency_ms": float(expectation.estimate(dist, rng)[0]), "argmax_latency_ms": argmax_lat,
        "argmax_arch": dist.decode(derived_genes)[0].to_json(), "repair": moves,
        "band_ms": [band * budget, budget], "seeded": seeded,
        "in_band": band * budget <= float(latency_model.predict(best)) <= budget,
    }
    if rewards is not None and finetune:
        info["supernet_evaluations"] = getattr(final_eval, "evaluations", None)
    result = build_result(space, archs, lat_of, acc_of, generation, budget_ms=budget, latency_model=latency_model,
                          strategy="differentiable", seed=seed, history=history, stop_reason=stop, info=info,
                          costs=costs)
    row = result.candidates.set_index("arch_id", drop=False).loc[best.arch_id]
    state = None
    if rewards is not None and finetune:
        state = {k: v.detach().cpu().clone() for k, v in rewards.net.state_dict().items()}
    return replace(result, best=best, best_row=row, supernet_state=state)
