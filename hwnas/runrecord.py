"""The run record: what a search chose and how (best.json), and a family of them (family.json).

A search and its export run at different times, often on different machines; the record is the
only thing that passes between them, so it holds everything the export must repeat (the data
split, the BN settings, the table and the drift the search predicted with, fine-tuned weights) and
everything a person asks of a result (the arch, its predicted latency, its accuracy and which
accuracy that is). It is written by `hwnas.search.pipeline` and read by `hwnas.export_pipeline`
through this one type, so the two cannot disagree on a field's name or meaning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwnas.arch import read_arch_json
from hwnas.errors import ArchError
from hwnas.evaluation import EvalSettings
from hwnas.fileio import atomic_write_text
from hwnas.jsonable import jsonable

if TYPE_CHECKING:
    from hwnas.search.result import SearchResult

BEST_NAME = "best.json"
FAMILY_NAME = "family.json"


@dataclass
class RunRecord:
    """best.json. `accuracy` is the figure the search chose by (`accuracy_metric`: the evaluator's
    "accuracy", or "confirmed_accuracy" when a predictor ranked and the supernet confirmed);
    `budget_ms` is the user's budget, `search_budget_ms` the one searched under when a guard band
    (`margin`) was kept. `arch` is None when no arch met the budget."""

    arch: dict[str, Any] | None
    arch_id: str | None = None
    space: str | None = None
    predicted_latency_ms: float | None = None
    accuracy: float | None = None
    accuracy_metric: str = "accuracy"
    budget_ms: float | None = None
    strategy: str | None = None
    seed: int | None = None
    queries: int | None = None
    search_accuracy: float | None = None  # what the evaluator saw, when the pick was by confirmed accuracy
    flops: int | None = None
    params: int | None = None
    # where it was searched, and how each arch was scored: what an export repeats
    supernet: str | None = None
    table: str | None = None
    device_slug: str | None = None
    dataset: str | None = None
    validation_images: int | None = None
    val_size: int | None = None
    val_batches: int | None = None
    batch_size: int | None = None
    bn_batches: int | None = None
    bn_batch_size: int | None = None
    # what else shaped the pick
    margin: float | None = None
    search_budget_ms: float | None = None
    latency_drift: dict[str, Any] | None = None  # the factor predictions were scaled by (--drift correct)
    seeded_from: str | None = None
    predictor: str | None = None
    supernet_evaluations: int | None = None
    measured_pick: dict[str, Any] | None = None
    finetuned_supernet: str | None = None
    resumed: dict[str, Any] | None = None  # evaluations replayed from a journal (--resume)

    @classmethod
    def from_result(cls, result: SearchResult, **context: Any) -> RunRecord:
        """The record of `result`'s best arch, with the `context` fields (which win over the result's)."""
        row = result.best_row
        record = cls(arch=None if row is None else json.loads(row["arch"]), space=result.space,
                     accuracy_metric=result.metric, budget_ms=result.budget_ms, strategy=result.strategy,
                     seed=result.seed, queries=result.queries)
        if row is not None:
            record.arch_id = str(row["arch_id"])
            record.predicted_latency_ms = float(row["latency_ms"])
            record.accuracy = float(row[result.metric])
            if result.metric != "accuracy":
                record.search_accuracy = float(row["accuracy"])
            record.flops = None if _missing(row["flops"]) else int(row["flops"])
            record.params = None if _missing(row["params"]) else int(row["params"])
        for name, value in context.items():
            if name not in _FIELDS:
                raise TypeError(f"RunRecord has no field {name!r}")
            setattr(record, name, value)
        return record

    # ---- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = jsonable({f.name: getattr(self, f.name) for f in fields(self)}, nonfinite_as_null=True)
        return data

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "run record") -> RunRecord:
        """A record from its JSON; a bare arch object (no "arch" field) is a record of that arch alone."""
        if not isinstance(data, Mapping):
            raise ArchError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if "arch" not in data:
            return cls(arch=dict(data))
        if data["arch"] is not None and not isinstance(data["arch"], Mapping):
            raise ArchError(f"{where}: field 'arch' must be a JSON object or null")
        return cls(**{name: data[name] for name in data if name in _FIELDS})  # newer fields: ignored

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        """Read best.json (or any arch file); a missing or malformed file is one ArchError naming it."""
        return cls.from_dict(read_arch_json(path), str(path))

    # ---- what an export reads -----------------------------------------------------------------------------
    @property
    def eval_settings(self) -> EvalSettings:
        """How the search scored the arch (defaults for what it did not record)."""
        return EvalSettings.from_record({f.name: getattr(self, f.name) for f in fields(self)})

    @property
    def drift_factor(self) -> float | None:
        """The factor the search scaled the table's predictions by, if it did."""
        drift = self.latency_drift
        if isinstance(drift, Mapping) and "factor" in drift:
            return float(drift["factor"])
        return None

    def context_items(self) -> list[tuple[str, Any]]:
        """The fields beyond the result's own, set ones only: the 'how' lines of summary.md."""
        return [(name, getattr(self, name)) for name in _CONTEXT if getattr(self, name) is not None]


_FIELDS = tuple(f.name for f in fields(RunRecord))
_CONTEXT = _FIELDS[_FIELDS.index("supernet"):]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class FamilyEntry:
    """One (device, budget) search of a family: where its run directory is and what it found."""

    dir: str
    table: str
    device_slug: str
    profile: str | None
    budget_ms: float
    best_arch_id: str | None
    predicted_latency_ms: float | None
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def write_family(out: str | Path, entries: list[FamilyEntry]) -> Path:
    """family.json: what `hwnas export --arch OUT` reads to export every member."""
    path = Path(out) / FAMILY_NAME
    atomic_write_text(path, json.dumps(jsonable([e.to_dict() for e in entries], nonfinite_as_null=True), indent=2)
                      + "\n")
    return path


def read_family(out: str | Path) -> list[FamilyEntry]:
    """The entries of OUT/family.json; a malformed file is one ArchError naming it and the entry."""
    path = Path(out) / FAMILY_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchError(f"{path}: not a readable family file ({exc})") from None
    if not isinstance(data, list):
        raise ArchError(f"{path}: expected a JSON list of searches")
    names = [f.name for f in fields(FamilyEntry)]
    entries = []
    for i, item in enumerate(data):
        if not isinstance(item, Mapping) or "dir" not in item:
            raise ArchError(f"{path}: entry {i} is not an object with a 'dir'")
        try:
            entries.append(FamilyEntry(**{n: item[n] for n in names}))
        except KeyError as exc:
            raise ArchError(f"{path}: entry {i} has no field {exc}") from None
    return entries


__all__ = ["BEST_NAME", "FAMILY_NAME", "FamilyEntry", "RunRecord", "read_family", "write_family"]
