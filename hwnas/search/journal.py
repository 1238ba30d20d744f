"""Resumable search: the evaluations a search paid for, saved atomically as each is made, and replayed after a kill.

What costs time in a search is evaluating archs (a supernet evaluation is a second or more on a
CPU); everything else (proposals, repair, selection, a predictor's fit) is a deterministic function
of the seed and of the accuracies seen. So the state worth saving is the evaluations themselves:
`EvaluationJournal.wrap(evaluator)` records every accuracy it is asked for and rewrites the
journal atomically after each one (a few milliseconds beside an evaluation's second), so a kill
loses at most the arch under way. `--resume` runs the same
search again from the start with the journal's accuracies answering every arch already paid for,
which reproduces the killed run's trajectory exactly (same seed, same accuracies, same choices) and
then continues it with real evaluations: the resumed run's candidates.csv is the uninterrupted
run's. The journal also keeps what a re-run would measure differently (the drift factor a
`--drift correct` search scaled its table by), and the settings it was made with: a resume with
other settings would replay another search, so it is refused, naming the setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.fileio import atomic_write_text
from hwnas.jsonable import jsonable
from hwnas.search.protocols import AccuracyEvaluator, arch_id_of, evaluate_accuracies

JOURNAL_NAME = "search_journal.json"
FORMAT = "hwnas-search-journal"
VERSION = 1


def file_digest(path: Path) -> str:
    """A short content hash: a journal names the supernet and tables it was made with by content, not by path."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def table_identity(table: Any) -> dict[str, Any]:
    """What decides a latency table's predictions: its files' contents and the drift it is scaled by."""
    if table.path is None or not table.path.is_file():
        return {"table": repr(table)}
    meta = table.path.with_name(table.path.name.removesuffix(".csv") + ".meta.json")
    return {"table": str(table.path), "csv": file_digest(table.path), "meta": file_digest(meta),
            "drift": table.meta.get("drift", {}).get("factor") if table.drifted else None}


class EvaluationJournal:
    """The accuracies a search was given, by arch id, with the settings (`identity`) that made them."""

    def __init__(self, path: str | Path, identity: Mapping[str, Any], *, resume: bool = False) -> None:
        self.path = Path(path)
        self.identity = jsonable(dict(identity))
        self.accuracies: dict[str, float] = {}
        self.notes: dict[str, Any] = {}
        self.replayed = 0  # answers taken from the journal instead of the evaluator
        if resume and self.path.is_file():
            self._load()
        self.known_at_start = len(self.accuracies)

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HwnasError(f"{self.path}: not a readable search journal ({exc}); delete it (or pass --force) to "
                             "start the search over") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise HwnasError(f"{self.path}: not an hwnas search journal (field 'format')")
        if data.get("version") != VERSION:
            raise HwnasError(f"{self.path}: journal version {data.get('version')!r}; this hwnas reads {VERSION}")
        recorded = data.get("identity")
        if not isinstance(recorded, dict):
            raise HwnasError(f"{self.path}: field 'identity' is missing")
        differ = sorted(k for k in set(recorded) | set(self.identity) if recorded.get(k) != self.identity.get(k))
        if differ:
            first = differ[0]
            raise HwnasError(f"{self.path}: the interrupted search ran with other settings ({', '.join(differ)}; "
                             f"{first} was {recorded.get(first)!r}, now {self.identity.get(first)!r}); resume with "
                             "the same settings, or pass --force to start over")
        evaluations = data.get("evaluations")
        if not isinstance(evaluations, list) or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], (int, float))
                for e in evaluations):
            raise HwnasError(f"{self.path}: field 'evaluations' must be a list of [arch_id, accuracy] pairs")
        self.accuracies = {arch_id: float(acc) for arch_id, acc in evaluations}
        notes = data.get("notes", {})
        self.notes = dict(notes) if isinstance(notes, dict) else {}

    def save(self) -> None:
        """Rewrite the journal atomically: a kill leaves the previous one or this one, never half of one."""
        atomic_write_text(self.path, json.dumps({
            "format": FORMAT, "version": VERSION, "identity": self.identity, "notes": jsonable(self.notes),
            "evaluations": [[k, v] for k, v in self.accuracies.items()]}) + "\n")

    def note(self, key: str, value: Any) -> None:
        """Keep a measured value the search depends on (re-measuring it on resume would change the trajectory)."""
        self.notes[key] = jsonable(value)
        self.save()

    def wrap(self, evaluator: AccuracyEvaluator) -> JournaledEvaluator:
        return JournaledEvaluator(evaluator, self)


class JournaledEvaluator:
    """An evaluator that answers from the journal what was paid for before, and journals what it pays for now.

    `evaluations` counts the distinct archs it answered (replayed or not): what the search cost in
    all, the same whether or not it was interrupted.
    """

    def __init__(self, evaluator: AccuracyEvaluator, journal: EvaluationJournal) -> None:
        self.evaluator, self.journal = evaluator, journal
        self.answered: set[str] = set()

    @property
    def evaluations(self) -> int:
        return len(self.answered)

    def evaluate(self, arch: Any) -> float:
        return float(self.evaluate_many([arch])[0])

    def evaluate_many(self, archs: Sequence[Any]) -> np.ndarray:
        known = self.journal.accuracies
        ids = [arch_id_of(a) for a in archs]
        todo = list({i: a for i, a in zip(ids, archs, strict=True) if i not in known}.values())
        replayed = {i for i in ids if i in known} - self.answered
        self.journal.replayed += len(replayed)
        for arch in todo:  # one at a time, saved after each: a kill loses at most the arch under way
            known[arch_id_of(arch)] = float(evaluate_accuracies(self.evaluator, [arch])[0])
            self.journal.save()
        self.answered.update(ids)
        return np.array([known[i] for i in ids], dtype=np.float64)

    def __getattr__(self, name: str) -> Any:  # the wrapped evaluator's other attributes (split, device, ...)
        return getattr(self.evaluator, name)


__all__ = ["JOURNAL_NAME", "EvaluationJournal", "JournaledEvaluator", "file_digest", "table_identity"]
