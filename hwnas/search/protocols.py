"""What a searcher needs from a space, a latency model and an accuracy evaluator: protocols, nothing more.

Searchers depend only on these, so a space defined outside hwnas (a user's own, or a cell space
scored from a table) is searched without touching hwnas, and the search package never imports the
latency package:

- `SearchSpaceLike`: `name`, `sample`, `mutate`, `crossover`, `smallest`, `largest`, `validate`
  (and `encode` / `encoding_size` for the accuracy predictor). Its archs are `ArchLike`: hashable,
  with a stable `arch_id` and `to_json()`.
- `LatencyModel`: `predict(arch) -> ms`; optionally `predict_many(archs)` (used for every batch of
  offspring), `latency_range(space) -> (min, max)`, the exact range a `LatencyTable` gives, and
  `block_cost(spec)`, a promise that latency adds up over blocks.
- `AccuracyEvaluator`: `evaluate(arch) -> accuracy`; optionally `evaluate_many(archs)`.

A space may also offer fast paths, found by name and used when present (`hwnas.SearchSpace` offers
all three): `gene_codec()` (its archs as integer rows, `GeneCodecLike`, for batched variation; a
codec with `row_pricer(model)` lets offspring be priced from their genes before they are built),
`encode_many(archs)` (batched features for the predictor) and `flops_params(arch)` (costs written
beside every candidate).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hwnas.errors import HwnasError


@runtime_checkable
class ArchLike(Hashable, Protocol):
    """An arch a searcher can keep: hashable (for deduplication), with a stable id and a JSON form."""

    @property
    def arch_id(self) -> str: ...

    def to_json(self) -> str: ...


@runtime_checkable
class SearchSpaceLike(Protocol):
    """The operations a searcher needs from a space; `hwnas.SearchSpace` is one.

    `mutate` must return an arch different from its input; `rng` is a numpy Generator.
    """

    @property
    def name(self) -> str: ...

    def sample(self, rng: Any = None) -> Any: ...

    def mutate(self, arch: Any, rng: Any = None, prob: float = 0.1) -> Any: ...

    def crossover(self, a: Any, b: Any, rng: Any = None) -> Any: ...

    def smallest(self) -> Any: ...

    def largest(self) -> Any: ...

    def validate(self, arch: Any) -> Any: ...


@runtime_checkable
class EncodableSpace(SearchSpaceLike, Protocol):
    """A space whose archs have fixed-size feature vectors: what the accuracy predictor needs."""

    @property
    def encoding_size(self) -> int: ...

    def encode(self, arch: Any) -> np.ndarray: ...


@runtime_checkable
class GeneCodecLike(Protocol):
    """Archs as rows of choice indices (column j takes values below `cardinality[j]`), varied in batches."""

    cardinality: np.ndarray

    def genes(self, archs: Sequence[Any], rng: np.random.Generator) -> np.ndarray: ...

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray: ...

    def decode(self, genes: np.ndarray) -> list[Any]: ...

    def mutate(self, genes: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray: ...

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


@runtime_checkable
class LatencyModel(Protocol):
    """Predicted latency in milliseconds (a `LatencyTable`, or anything with `predict`)."""

    def predict(self, arch: Any) -> float: ...


@runtime_checkable
class AccuracyEvaluator(Protocol):
    """Accuracy of an arch, higher is better (a supernet evaluator, a predictor, a lookup table)."""

    def evaluate(self, arch: Any) -> float: ...


@runtime_checkable
class SupernetScoring(AccuracyEvaluator, Protocol):
    """An evaluator backed by a supernet and data: what batch rewards and joint fine-tuning need.

    `validation_batch` / `training_batch` give one seeded batch at a resolution on `device`;
    `with_supernet(net)` is an evaluator with the same data and settings on other weights.
    """

    @property
    def supernet(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    def validation_batch(self, batch_size: int, resolution: int, seed: int) -> tuple[Any, Any]: ...

    def training_batch(self, batch_size: int, resolution: int, seed: int) -> tuple[Any, Any]: ...

    def with_supernet(self, supernet: Any) -> SupernetScoring: ...


def gene_codec_of(space: Any) -> GeneCodecLike | None:
    """The space's gene codec when it offers one (`space.gene_codec()`), else None."""
    make = getattr(space, "gene_codec", None)
    return make() if callable(make) else None


def predict_latencies(model: LatencyModel, archs: Sequence[Any]) -> np.ndarray:
    """Latencies of many archs: `predict_many` when the model has it (one call per batch), else a loop."""
    if not archs:
        return np.zeros(0)
    many = getattr(model, "predict_many", None)
    if many is not None:
        return np.asarray(many(archs), dtype=np.float64).reshape(len(archs))
    return np.fromiter((model.predict(a) for a in archs), dtype=np.float64, count=len(archs))


def evaluate_accuracies(evaluator: AccuracyEvaluator, archs: Sequence[Any]) -> np.ndarray:
    """Accuracies of many archs: `evaluate_many` when the evaluator has it, else a loop."""
    if not archs:
        return np.zeros(0)
    many = getattr(evaluator, "evaluate_many", None)
    if many is not None:
        out = np.asarray(many(archs), dtype=np.float64).reshape(len(archs))
    else:
        out = np.fromiter((evaluator.evaluate(a) for a in archs), dtype=np.float64, count=len(archs))
    if not np.isfinite(out).all():
        bad = archs[int(np.flatnonzero(~np.isfinite(out))[0])]
        raise HwnasError(f"the accuracy evaluator returned a non-finite accuracy for arch {arch_id_of(bad)}")
    return out


class FunctionEvaluator:
    """An `AccuracyEvaluator` from a plain function of an arch (a lookup table, a synthetic benchmark)."""

    def __init__(self, fn: Callable[[Any], float]) -> None:
        self.fn = fn
        self.calls = 0

    def evaluate(self, arch: Any) -> float:
        self.calls += 1
        return float(self.fn(arch))


def arch_id_of(arch: Any) -> str:
    return str(getattr(arch, "arch_id", repr(arch)))


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
