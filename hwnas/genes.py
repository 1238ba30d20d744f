"""An `hwnas.SearchSpace`'s archs as rows of choice indices: vectorised variation, pricing and encoding.

A search over 50k candidates cannot afford a Python object per proposal, so a `SearchSpace` hands
its searchers a `GeneCodec` (`SearchSpace.gene_codec()`): children are bred a batch at a time on
integer rows, priced by `SlotLatency` without being decoded, and only the survivors become `Arch`
objects. `encode_many` is the batched one-hot encoding the accuracy predictor scores. All three
read the space's one slot-spec source, `SearchSpace.slot_specs`; searchers reach them through the
space's optional methods (`hwnas.search.protocols`), never by testing for `SearchSpace`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hwnas.arch import Arch

if TYPE_CHECKING:
    from hwnas.space import SearchSpace


class GeneCodec:
    """Archs of a `SearchSpace` as rows of choice indices, for vectorised mutation and crossover.

    Columns: resolution, depth per stage, then kernel and expand of every slot of every stage up
    to the maximum depth. Slots beyond a stage's depth are latent genes: they do not change the
    network, but a child inherits them, so growing a stage back restores its parent's blocks
    (Once-for-All keeps them the same way). Variation is per gene, as `SearchSpace.mutate` and
    `crossover` do it: mutation resamples each gene with probability `prob`, crossover takes each
    gene from either parent.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.stages, self.depth = space.num_stages, space.max_depth
        # normalised as `Arch` normalises them, so decoded archs (`Arch.of_choices`) equal archs built by hand
        self.res_choices = tuple(int(v) for v in space.resolution_choices)
        self.depth_choices = tuple(int(v) for v in space.depth_choices)
        self.kernel_choices = tuple(int(v) for v in space.kernel_choices)
        self.expand_choices = tuple(float(e) if float(e) % 1 else int(e) for e in space.expand_choices)
        slots = self.stages * self.depth
        self.k0, self.e0 = 1 + self.stages, 1 + self.stages + slots
        self.width = 1 + self.stages + 2 * slots
        self.cardinality = np.array([len(self.res_choices)] + [len(self.depth_choices)] * self.stages
                                    + [len(self.kernel_choices)] * slots + [len(self.expand_choices)] * slots)

    def genes(self, archs: Sequence[Arch], rng: np.random.Generator) -> np.ndarray:
        """Gene rows of `archs`; latent slots are drawn at random."""
        g = self.random(len(archs), rng)
        res = {v: i for i, v in enumerate(self.res_choices)}
        dep = {v: i for i, v in enumerate(self.depth_choices)}
        ker = {v: i for i, v in enumerate(self.kernel_choices)}
        exp = {v: i for i, v in enumerate(self.expand_choices)}
        for row, arch in enumerate(archs):
            g[row, 0] = res[arch.resolution]
            j = 0
            for s, d in enumerate(arch.depths):
                g[row, 1 + s] = dep[d]
                for i in range(d):
                    g[row, self.k0 + s * self.depth + i] = ker[arch.kernels[j]]
                    g[row, self.e0 + s * self.depth + i] = exp[arch.expands[j]]
                    j += 1
        return g

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.cardinality, size=(n, self.width))

    def decode(self, genes: np.ndarray) -> list[Arch]:
        genes = np.asarray(genes)
        if len(genes) == 0:
            return []
        name, depth = self.space.name, self.depth
        # choices looked up column-wise as Python objects (an object array keeps 3 an int and 2.5 a float, so
        # decoded archs keep the JSON form, and the id, of archs built by hand)
        res = self._values(self.res_choices, genes[:, 0])
        dep = self._values(self.depth_choices, genes[:, 1:self.k0])
        ker = self._values(self.kernel_choices, genes[:, self.k0:self.e0])
        exp = self._values(self.expand_choices, genes[:, self.e0:])
        starts = [s * depth for s in range(self.stages)]
        out = []
        for r, depths, ks, es in zip(res, dep, ker, exp, strict=True):
            kernels: list[int] = []
            expands: list[float] = []
            for start, d in zip(starts, depths, strict=True):
                kernels += ks[start:start + d]
                expands += es[start:start + d]
            out.append(Arch.of_choices(name, r, tuple(depths), tuple(kernels), tuple(expands)))
        return out

    @staticmethod
    def _values(choices: tuple[Any, ...], index: np.ndarray) -> list[Any]:
        table = np.empty(len(choices), dtype=object)
        table[:] = list(choices)
        return table[index].tolist()

    def mutate(self, genes: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
        hit = rng.random(genes.shape) < prob
        return np.where(hit, self.random(len(genes), rng), genes)

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.where(rng.random(a.shape) < 0.5, b, a)

    def row_pricer(self, model: Any) -> SlotLatency | None:
        """`SlotLatency` for `model` when it adds up per-block costs (has `block_cost`), else None."""
        return SlotLatency(self, model) if callable(getattr(model, "block_cost", None)) else None


class SlotLatency:
    """Latency of gene rows without building archs, for a model that adds up per-block costs.

    A `LatencyTable` predicts `intercept + sum of block_cost(spec)` over an arch's blocks, and a
    block's spec depends only on its slot (`SearchSpace.slot_specs`): one small cost tensor
    `cost[resolution, stage, index, kernel, expand]` then prices any gene row with numpy. Searchers
    use it to screen offspring and repair variants before decoding them; every arch they keep is
    still priced by the model's own `predict_many`. The intercept is what `predict` adds to the
    block costs of one arch; whether the model is additive at all is for the caller to check
    (`hwnas.search.distribution.ExpectedLatency` does).
    """

    def __init__(self, codec: GeneCodec, model: Any) -> None:
        space = codec.space
        block_cost: Callable[[Any], float] = model.block_cost
        self.cost = np.zeros((len(codec.res_choices), codec.stages, codec.depth, len(codec.kernel_choices),
                              len(codec.expand_choices)))
        self.fixed = np.zeros(len(codec.res_choices))
        self.depth_values = np.asarray(codec.depth_choices)
        self.codec = codec
        for r, resolution in enumerate(codec.res_choices):
            specs = space.slot_specs(resolution)
            self.fixed[r] = sum(block_cost(spec) for spec in specs.fixed)
            for (stage, index, kernel, expand), spec in specs.mbconv.items():
                k, e = codec.kernel_choices.index(kernel), codec.expand_choices.index(expand)
                self.cost[r, stage, index, k, e] = block_cost(spec)
        probe = space.smallest()
        self.intercept = float(model.predict(probe)) - sum(block_cost(spec) for spec in space.blocks(probe))

    def __call__(self, genes: np.ndarray) -> np.ndarray:
        c = self.codec
        n, s, d = len(genes), c.stages, c.depth
        res = genes[:, 0]
        depth = self.depth_values[genes[:, 1:c.k0]]
        kernel = genes[:, c.k0:c.e0].reshape(n, s, d)
        expand = genes[:, c.e0:].reshape(n, s, d)
        cost = self.cost[res[:, None, None], np.arange(s)[None, :, None], np.arange(d)[None, None, :], kernel, expand]
        active = np.arange(d)[None, None, :] < depth[:, :, None]
        return self.fixed[res] + (cost * active).sum(axis=(1, 2)) + self.intercept


class OneHotEncoder:
    """`SearchSpace.encode` for many archs at once: every arch's one-hot columns gathered in one pass
    and set with one fancy-indexing assignment (tests check it equals `encode`)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.size = int(space.encoding_size)
        nr, nd = len(space.resolution_choices), len(space.depth_choices)
        nk = len(space.kernel_choices)
        per_slot = nk + len(space.expand_choices)
        self._res = {r: i for i, r in enumerate(space.resolution_choices)}
        self._depth = [{d: nr + s * nd + i for i, d in enumerate(space.depth_choices)}
                       for s in range(space.num_stages)]
        start = nr + space.num_stages * nd
        self._slot = [[start + (s * space.max_depth + i) * per_slot for i in range(space.max_depth)]
                      for s in range(space.num_stages)]
        self._kernel = {k: i for i, k in enumerate(space.kernel_choices)}
        self._expand = {e: nk + i for i, e in enumerate(space.expand_choices)}

    def __call__(self, archs: Sequence[Arch]) -> np.ndarray:
        rows: list[int] = []
        cols: list[int] = []
        res, depth_cols, slot, kernel, expand = self._res, self._depth, self._slot, self._kernel, self._expand
        row = 0
        try:
            for row, arch in enumerate(archs):
                c = [res[arch.resolution]]
                kernels, expands = arch.kernels, arch.expands
                j = 0
                for s, d in enumerate(arch.depths):
                    c.append(depth_cols[s][d])
                    base = slot[s]
                    for i in range(d):
                        c.append(base[i] + kernel[kernels[j]])
                        c.append(base[i] + expand[expands[j]])
                        j += 1
                cols.extend(c)
                rows.extend([row] * len(c))
        except (KeyError, IndexError):
            self.space.validate(archs[row])  # names the bad field
            raise
        x = np.zeros((len(archs), self.size), dtype=np.float32)
        x[rows, cols] = 1.0
        return x
