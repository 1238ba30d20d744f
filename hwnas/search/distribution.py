"""The distribution the differentiable search learns, and its expected latency (see `hwnas.search.differentiable`).

`ArchDistribution` holds independent categoricals (torch logits) over the choices of an
`hwnas.SearchSpace`, on its gene rows (`hwnas.genes.GeneCodec`); `ExpectedLatency` is
E[predicted latency] under it: exact, by linearity, for a model that adds up block costs, else a
Monte-Carlo estimate with a score-function gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hwnas.errors import HwnasError
from hwnas.genes import GeneCodec, SlotLatency
from hwnas.search.protocols import LatencyModel, gene_codec_of, predict_latencies

DTYPE = torch.float64


def codec_of(space: Any) -> Any:
    """The space's gene codec: the genes the differentiable search learns a distribution over."""
    codec = gene_codec_of(space)
    if codec is None:
        raise HwnasError(f"the differentiable strategy needs a space with a gene codec (gene_codec(): its genes are "
                         f"what it learns a distribution over, see hwnas/examples/cell_space.py); space "
                         f"'{space.name}' is a {type(space).__name__} without one")
    return codec


def distribution_for(space: Any) -> ArchDistribution | CategoricalDistribution:
    """The layout-aware distribution of an `hwnas.SearchSpace` (latent slots, exact expected latency), else one
    independent categorical per gene of the space's codec."""
    codec = codec_of(space)
    return ArchDistribution(space) if isinstance(codec, GeneCodec) else CategoricalDistribution(codec)


class CategoricalDistribution:
    """Independent categoricals (torch logits), one per column of any space's gene codec.

    A column of cardinality c draws from its first c logits; the rest are masked out. A codec that
    offers `active(rows)` (which columns change the network) has `log_prob` count those only, as
    `ArchDistribution` does for latent slots; otherwise every column counts.
    """

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.card = np.asarray(codec.cardinality, dtype=np.int64)
        width, most = len(self.card), int(self.card.max())
        self.valid = torch.as_tensor(np.arange(most)[None, :] < self.card[:, None])
        self.logits = torch.zeros((width, most), dtype=DTYPE, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.logits]

    def _log_probs(self) -> torch.Tensor:
        return F.log_softmax(self.logits.masked_fill(~self.valid, -1e9), -1)

    def probs(self) -> torch.Tensor:
        return self._log_probs().exp() * self.valid

    def _active(self, genes: np.ndarray) -> torch.Tensor:
        active = getattr(self.codec, "active", None)
        mask = np.asarray(active(genes), dtype=bool) if callable(active) else np.ones(genes.shape, dtype=bool)
        return torch.as_tensor(mask, dtype=DTYPE)

    def init_from(self, archs: Iterable[Any], weight: float = 1.0) -> int:
        """Lean the logits toward `archs`: + weight * log(1 + count) per chosen value."""
        archs = list(archs)
        if not archs:
            return 0
        genes = self.codec.genes(archs, np.random.default_rng(0))
        with torch.no_grad():
            for col in range(len(self.card)):
                counts = np.bincount(genes[:, col], minlength=self.logits.shape[1])
                self.logits[col] += weight * torch.log1p(torch.as_tensor(counts, dtype=DTYPE))
        return len(archs)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        with torch.no_grad():
            p = self.probs().numpy()
        return _draw(rng, p, n)

    def argmax(self) -> np.ndarray:
        with torch.no_grad():
            return self.logits.masked_fill(~self.valid, -1e9).argmax(-1).numpy().astype(np.int64)

    def log_prob(self, genes: np.ndarray) -> torch.Tensor:
        g = torch.as_tensor(np.asarray(genes, dtype=np.int64))
        lp = self._log_probs()
        picked = lp[torch.arange(lp.shape[0])[None, :], g]
        return (picked * self._active(np.asarray(genes))).sum(1)

    def entropy(self) -> torch.Tensor:
        lp = self._log_probs()
        return -(lp.exp() * lp * self.valid).sum()

    def decode(self, genes: np.ndarray) -> list[Any]:
        return list(self.codec.decode(np.asarray(genes, dtype=np.int64).reshape(-1, len(self.card))))


def _draw(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """`n` draws from each row of `probs` (B, C): an (n, B) array of choice indices."""
    cum = np.cumsum(probs, axis=-1)
    cum[:, -1] = 1.0
    u = rng.random((n, probs.shape[0], 1))
    return (cum[None] <= u).sum(axis=-1)


class ArchDistribution:
    """Independent categoricals (torch logits) over the choices of an `hwnas.SearchSpace`.

    Archs are handled as `GeneCodec` rows: resolution, depth per stage, then kernel and expand of
    every slot (stage-major) up to the maximum depth. `log_prob` and `entropy` count the active
    choices only, so they are those of the distribution over distinct networks.
    """

    def __init__(self, space: Any) -> None:
        self.space = space
        codec = codec_of(space)
        if not isinstance(codec, GeneCodec):
            raise HwnasError(f"ArchDistribution is laid out on an hwnas.SearchSpace's genes; space '{space.name}' "
                             "has another codec (distribution_for chooses the right distribution)")
        self.codec = codec
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


class ExpectedLatency:
    """E[predicted latency] of a distribution over a space's genes: exact from block costs (an `ArchDistribution`
    of an `hwnas.SearchSpace` under an additive table), else a Monte-Carlo estimate from predictions.

    Exact when the model has `block_cost` (a `LatencyTable`) and every stage has at least one block
    (so a block's input size depends on the resolution and its own position only); then `cost`
    (resolution, stage, slot, kernel, expand), `fixed` (stem, first block and head per resolution)
    and `intercept` reproduce `predict` for every arch, which is checked here on a few archs.
    """

    def __init__(self, space: Any, model: LatencyModel, *, mc_samples: int = 64, check: int = 8) -> None:
        self.space, self.model, self.mc_samples = space, model, int(mc_samples)
        self.codec = codec = codec_of(space)
        self.width = len(np.asarray(codec.cardinality))
        self.slot: SlotLatency | None = None
        slot = codec.row_pricer(model) if isinstance(codec, GeneCodec) and min(codec.depth_choices) >= 1 else None
        if slot is not None:
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

    def exact(self, dist: Any) -> torch.Tensor:
        """The exact expectation in calibrated milliseconds, differentiable in the logits."""
        if self.slot is None:
            raise HwnasError("this latency model has no block costs: its expected latency is only estimated")
        pr, pd, pk, pe = dist.probs()
        presence = pd @ dist.present  # (s, m)
        per_slot = torch.einsum("rsmke,smk,sme->rsm", self.cost, pk, pe)
        return self.intercept + pr @ (self.fixed + (per_slot * presence).sum((1, 2)))

    def estimate(self, dist: Any, rng: np.random.Generator) -> tuple[float, torch.Tensor]:
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
        genes = np.asarray(genes, dtype=np.int64).reshape(-1, self.width)
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
