"""An example of a search space from outside the presets: a NAS-Bench-201-style cell, searched through the protocols.

A cell of 4 nodes has 6 edges; each edge carries one of 5 operations (none, skip, 1x1 conv, 3x3
conv, 3x3 average pool): 5^6 = 15,625 archs. Nothing here is an `hwnas.SearchSpace`, a supernet or a
latency table: the space gives the operations every searcher needs (`hwnas/search/protocols.py`),
a gene codec (so the differentiable searcher and the batched breeders run on it too), a latency
model that adds up per-edge costs, and an accuracy evaluator. The numbers are made up (a smooth
trend with interactions between edges, deterministic per seed): the example shows the wiring, not
a result. From the command line:

    hwnas search --space hwnas.examples.cell_space:space --latency hwnas.examples.cell_space:latency \\
        --evaluator hwnas.examples.cell_space:evaluator --budget-ms 3.0 --strategy evolution --out results/cell

A space of your own needs the same: `name`, `sample(rng)`, `mutate(arch, rng, prob)` (a different
arch), `crossover(a, b, rng)`, `smallest()`, `largest()`, `validate(arch)` (raise `hwnas.errors.ArchError`
naming what is wrong); archs that are hashable with an `arch_id` and `to_json()`; and, optionally,
`encode` / `encoding_size` (the accuracy predictor) and `gene_codec()` (batched variation, the
differentiable searcher).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from hwnas.errors import ArchError

OPS = ("none", "skip", "conv1x1", "conv3x3", "avgpool3x3")
EDGES = 6
COST_MS = (0.0, 0.02, 0.25, 0.9, 0.12)  # per edge, by operation: what a latency table would hold


def _rng(rng: Any) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


@dataclass(frozen=True)
class Cell:
    """One arch: the operation index of each of the 6 edges."""

    ops: tuple[int, ...]

    @property
    def arch_id(self) -> str:
        return "cell-" + "".join(map(str, self.ops))

    def to_json(self) -> str:
        return json.dumps({"space": "cell", "ops": [OPS[o] for o in self.ops]})


class CellCodec:
    """Cells as integer rows (one column per edge): batched variation and the differentiable search's genes."""

    def __init__(self) -> None:
        self.cardinality = np.full(EDGES, len(OPS))

    def genes(self, archs: Any, rng: np.random.Generator) -> np.ndarray:
        return np.array([a.ops for a in archs], dtype=np.int64).reshape(-1, EDGES)

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, len(OPS), size=(n, EDGES))

    def decode(self, genes: np.ndarray) -> list[Cell]:
        return [Cell(tuple(int(v) for v in row)) for row in np.asarray(genes).reshape(-1, EDGES)]

    def mutate(self, genes: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
        return np.where(rng.random(genes.shape) < prob, self.random(len(genes), rng), genes)

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.where(rng.random(a.shape) < 0.5, b, a)


class CellSpace:
    """The 15,625 cells (see the module doc)."""

    name = "cell"
    encoding_size = EDGES * len(OPS)

    def sample(self, rng: Any = None) -> Cell:
        return Cell(tuple(int(v) for v in _rng(rng).integers(len(OPS), size=EDGES)))

    def mutate(self, arch: Cell, rng: Any = None, prob: float = 0.1) -> Cell:
        rng = _rng(rng)
        ops = np.array(arch.ops)
        hit = rng.random(EDGES) < prob
        ops[hit] = rng.integers(len(OPS), size=int(hit.sum()))
        if tuple(ops) == arch.ops:  # always another cell
            edge = int(rng.integers(EDGES))
            ops[edge] = (ops[edge] + 1 + rng.integers(len(OPS) - 1)) % len(OPS)
        return Cell(tuple(int(v) for v in ops))

    def crossover(self, a: Cell, b: Cell, rng: Any = None) -> Cell:
        take = _rng(rng).random(EDGES) < 0.5
        return Cell(tuple(x if t else y for x, y, t in zip(a.ops, b.ops, take, strict=True)))

    def smallest(self) -> Cell:
        return Cell((0,) * EDGES)

    def largest(self) -> Cell:
        return Cell((OPS.index("conv3x3"),) * EDGES)

    def validate(self, arch: Any) -> Cell:
        if not isinstance(arch, Cell):
            raise ArchError(f"expected a cell of space 'cell', got {type(arch).__name__}")
        if len(arch.ops) != EDGES or not all(0 <= o < len(OPS) for o in arch.ops):
            raise ArchError(f"a cell has {EDGES} edges of operations 0..{len(OPS) - 1}, got {arch.ops}")
        return arch

    def encode(self, arch: Cell) -> np.ndarray:
        x = np.zeros(self.encoding_size, dtype=np.float32)
        x[np.arange(EDGES) * len(OPS) + np.array(arch.ops)] = 1
        return x

    def gene_codec(self) -> CellCodec:
        return CellCodec()

    def all_archs(self) -> list[Cell]:
        return [Cell(ops) for ops in itertools.product(range(len(OPS)), repeat=EDGES)]


class CellLatency:
    """Milliseconds as the sum of each edge's operation cost, plus a fixed stem and head."""

    fixed_ms = 0.4

    def predict(self, arch: Cell) -> float:
        return self.fixed_ms + sum(COST_MS[o] for o in arch.ops)

    def predict_many(self, archs: Any) -> np.ndarray:
        ops = np.array([a.ops for a in archs], dtype=np.int64).reshape(-1, EDGES)
        return self.fixed_ms + np.asarray(COST_MS)[ops].sum(axis=1)

    def latency_range(self, space: Any) -> tuple[float, float]:
        return self.fixed_ms + EDGES * min(COST_MS), self.fixed_ms + EDGES * max(COST_MS)


class CellAccuracy:
    """A made-up accuracy (%): convolutions help, a cell without a path from input to output is poor, and
    pairs of edges interact; deterministic for a seed."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.gain = rng.normal(0, 1.0, size=(EDGES, len(OPS))) + np.array([-4.0, 0.0, 1.5, 3.0, 0.5])
        self.pairs = rng.normal(0, 0.6, size=(EDGES, EDGES, len(OPS), len(OPS)))
        self.evaluations = 0

    def evaluate(self, arch: Cell) -> float:
        self.evaluations += 1
        ops = arch.ops
        value = 70.0 + sum(self.gain[e, o] for e, o in enumerate(ops))
        value += sum(self.pairs[i, j, ops[i], ops[j]] for i in range(EDGES) for j in range(i + 1, EDGES))
        if ops[0] == 0 and ops[1] == 0 and ops[3] == 0:  # no edge out of the input: nothing flows
            value -= 30.0
        return float(value)


def space() -> CellSpace:
    """`--space hwnas.examples.cell_space:space`."""
    return CellSpace()


def latency(space: Any = None) -> CellLatency:
    """`--latency hwnas.examples.cell_space:latency` (called with the space)."""
    return CellLatency()


def evaluator(space: Any = None) -> CellAccuracy:
    """`--evaluator hwnas.examples.cell_space:evaluator` (called with the space)."""
    return CellAccuracy()


__all__ = ["OPS", "Cell", "CellAccuracy", "CellCodec", "CellLatency", "CellSpace", "evaluator", "latency", "space"]
