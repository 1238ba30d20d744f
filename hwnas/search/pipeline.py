"""`run_search`: everything `hwnas search` does, as one library call: tables x budgets, drift, seeding,
predictor-then-confirm, a guard band, timed finalists, fine-tuned weights, run records, resume.

The searchers (`hwnas.search.evolution` and the rest) know only protocols; this module is the one
place in the search package that puts real parts behind them: it loads the supernet checkpoint and
the data (`SupernetEvaluator`), the latency tables and their drift check (`hwnas.latency`), and
writes what a later stage reads (`hwnas.report`, `hwnas.runrecord`). A search per (table, budget)
shares one cached evaluator, so a family of deploy targets costs little more than one search.
Every evaluation goes through an `EvaluationJournal`, so a killed search resumes (`resume=True`)
on the same trajectory. Progress lines go to `log`, warnings to `warn` (the CLI prints them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from hwnas.errors import ArchError, BudgetError, HwnasError
from hwnas.fileio import atomic_write_text, check_output_dir, display_path, recorded_path
from hwnas.runrecord import BEST_NAME, FAMILY_NAME, FamilyEntry, RunRecord, write_family
from hwnas.search import check_budget, confirm, get_strategy, random_search
from hwnas.search.journal import JOURNAL_NAME, EvaluationJournal, JournaledEvaluator, file_digest, table_identity
from hwnas.search.request import DRIFT_MODES, SearchRequest, check_margin
from hwnas.search.result import SearchResult

if TYPE_CHECKING:
    from hwnas.latency.table import LatencyTable
    from hwnas.space import Arch, SearchSpace

Log = Callable[[str], None]
def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)



@dataclass
class Target:
    """A latency model to search under: a latency table (a device and profile), or a user's own model."""

    model: Any  # a LatencyTable, or any LatencyModel
    label: str  # what best.json records as its "table"
    device_slug: str
    profile: str | None

    @property
    def table(self) -> LatencyTable | None:
        from hwnas.latency.table import LatencyTable

        return self.model if isinstance(self.model, LatencyTable) else None

    @classmethod
    def of_table(cls, table: LatencyTable) -> Target:
        return cls(table, str(table.path), table.device_slug, (table.profile_dict or {}).get("name"))


@dataclass
class SearchOutcome:
    """One (table, budget) search: its result, its run record (best.json) and the files it wrote."""

    name: str | None  # the family member's folder under the run directory; None for a single search
    directory: Path
    target: Target
    budget_ms: float
    result: SearchResult
    record: RunRecord
    files: dict[str, Path]


@dataclass
class SearchRun:
    """Everything `run_search` did: one outcome per (table, budget), in table-major order."""

    out: Path
    outcomes: list[SearchOutcome]
    evaluations: int  # distinct archs the supernet scored in all (replayed ones included)
    replayed: int = 0  # of them, answered from the journal of an interrupted run
    family_files: list[Path] = field(default_factory=list)

    @property
    def family(self) -> bool:
        return len(self.outcomes) > 1 or bool(self.family_files)


def read_seed_population(run_dir: Path, space: SearchSpace) -> list[Arch]:
    """The archs of an earlier run's front, refusing archs of another space by name."""
    from hwnas.report import read_front_archs

    archs = []
    for i, data in enumerate(read_front_archs(run_dir)):
        if data.get("space") != space.name:
            raise ArchError(f"--seed-from {run_dir}: front arch {i} is of space '{data.get('space')}', this search "
                            f"is over '{space.name}' (seed from a run of the same space)")
        try:
            archs.append(space.arch_from_dict(data))
        except ArchError as exc:
            raise ArchError(f"--seed-from {run_dir}: front arch {i}: {exc}") from None
    return archs


def run_search(request: SearchRequest, *, log: Log = print, warn: Log = _stderr_warning) -> SearchRun:
    """Search `request.supernet` under every (table, budget) of `request`, write the run directory, return it all.

    Writes OUT/candidates.csv, pareto.csv, pareto.png, best.json, history.csv, summary.md (one
    folder per member and OUT/family.json + family.md for a family) and OUT/search_journal.json.
    Every infeasible (table, budget) pair is refused before any evaluation.
    """
    from hwnas.latency.table import LatencyTable

    request.check()
    check_output_dir(request.out_dir())
    space, evaluator, data_spec = _scorer(request)
    targets = [Target.of_table(t if isinstance(t, LatencyTable) else LatencyTable.load(t)) for t in request.tables]
    if request.latency is not None:
        model = _plugin(request.latency, "latency model", space)
        targets.append(Target(model, str(request.latency), "custom", None))
    for target in targets:
        if target.table is not None:
            for note in target.table.check_target(space, allow_mismatch=request.allow_mismatch):
                warn(f"{target.table.path}: {note}")
    out = request.out_dir()
    journal = _journal(request, out, [t.model for t in targets])
    if request.drift != "off":
        targets = [Target.of_table(_drift_checked(t.table, request.drift == "correct", journal, log, warn))
                   if t.table is not None else t for t in targets]
    for index, target in enumerate(targets):
        for budget in request.budgets_of(index):  # every infeasible pair is refused before any evaluation
            _check_pair(space, target, budget, request)
    seeds = read_seed_population(request.seed_from, space) if request.seed_from is not None else []
    scored = journal.wrap(evaluator)
    if journal.known_at_start:
        log(f"resuming: {journal.known_at_start} evaluations of the interrupted search are replayed from "
            f"{journal.path}")
    outcomes = []
    for index, target in enumerate(targets):
        for budget in request.budgets_of(index):
            name = f"{target.device_slug}__{target.profile or 'model'}__{budget:g}ms" if request.family else None
            if name:
                log(f"== {name}")
            outcomes.append(_search_one(request, space, target, budget, scored, seeds, out / name if name else out,
                                        data_spec, name, journal, log, warn))
    run = SearchRun(out=out, outcomes=outcomes, evaluations=scored.evaluations, replayed=journal.replayed)
    if request.family:
        run.family_files = _write_family(out, outcomes, scored.evaluations, request.supernet, log)
    return run


def _check_pair(space: Any, target: Target, budget: float, request: SearchRequest) -> None:
    """Refuse a budget the table's space cannot meet, naming the table and the feasible range."""
    searched = budget * (1 - request.margin)
    try:
        check_budget(space, target.model, searched, seed=request.seed)
    except BudgetError as exc:
        guard = f" (the budget less the {request.margin:.0%} guard band)" if request.margin else ""
        raise BudgetError(f"table {target.label}: {exc}{guard}; give this table a budget in that range "
                          f"(--table {target.label}:MS)") from None


def _plugin(value: Any, what: str, space: Any) -> Any:
    """A user's object: given as one, or built by `package.module:factory` called with the space."""
    if isinstance(value, str):
        from hwnas.plugins import call

        return call(value, what, space)
    return value


def _scorer(request: SearchRequest) -> tuple[Any, Any, str | None]:
    """The space, the accuracy evaluator and the dataset's name: a supernet's, or the user's own."""
    from hwnas import spaces

    if request.evaluator is not None:
        space = spaces.get_any(str(request.space))
        return space, _plugin(request.evaluator, "evaluator", space), None
    from hwnas.checkpoint import load_supernet

    assert request.supernet is not None  # check() saw to it
    supernet, state = load_supernet(request.supernet)
    if request.space is not None:
        named = spaces.get_any(request.space)
        if named != supernet.space:
            raise HwnasError(f"--space {request.space} is not the space {request.supernet} was trained on "
                             f"('{supernet.space.name}'); leave --space out to search the checkpoint's own")
    evaluator, data_spec = _evaluator(request, supernet, state)
    return supernet.space, evaluator, data_spec


def _journal(request: SearchRequest, out: Path, models: list[Any]) -> EvaluationJournal:
    """The run directory's journal: refused when it holds an earlier search and neither resume nor force says what
    to do with it; continued (replayed) with `resume`; started afresh otherwise."""
    marker = out / (FAMILY_NAME if request.family else BEST_NAME)
    journal_path = out / JOURNAL_NAME
    if not (request.force or request.resume):
        if marker.exists():
            raise HwnasError(f"{out} holds an earlier search ({marker.name}); pass --force to overwrite or "
                             "choose --out")
        if journal_path.exists():
            raise HwnasError(f"{out} holds an interrupted search ({JOURNAL_NAME}); pass --resume to continue it, "
                             "--force to start over, or choose --out")
    if request.resume and not journal_path.exists() and marker.exists():
        raise HwnasError(f"{out} holds a search without a journal ({marker.name} only, written before searches "
                         "could resume); pass --force to run it again")
    keep = ("strategy", "queries", "population", "steps", "reward", "val_size", "val_batches", "batch_size",
            "bn_batches", "bn_batch_size", "predictor", "predictor_kind", "predictor_queries", "confirm", "seed",
            "margin", "drift")
    identity: dict[str, Any] = {name: getattr(request, name) for name in keep}
    scorer = (f"{Path(request.supernet).name} {file_digest(Path(request.supernet))}" if request.supernet is not None
              else f"evaluator {request.evaluator!s}")
    budgets: list[Any] = ([request.budgets_of(i) for i in range(len(models))] if request.table_budgets_ms else
                          [float(b) for b in request.budgets_ms])
    identity.update(budgets_ms=budgets, supernet=scorer, space=request.space,
                    tables=[table_identity(m) if hasattr(m, "meta") else {"latency": str(request.latency)}
                            for m in models],
                    data=request.data if isinstance(request.data, str) or request.data is None else
                    request.data.spec, seed_from=None if request.seed_from is None else str(request.seed_from))
    return EvaluationJournal(journal_path, identity, resume=request.resume)


def _drift_checked(table: LatencyTable, correct: bool, journal: EvaluationJournal, log: Log, warn: Log
                   ) -> LatencyTable:
    """The table, scaled by the drift measured now (or, on resume, by the one the interrupted run measured)."""
    from hwnas.latency.drift import apply_drift, check_drift

    key = f"drift {table.path}"
    if key in journal.notes:  # the trajectory depends on the factor: keep the one measured before
        note = dict(journal.notes[key])
        log(f"{table.path}: drift measured by the interrupted search: {float(note['factor']):.3f}x")
        if note.get("applied") is None:
            return table
        applied = dict(note["applied"])
        return table.with_drift(float(applied.pop("factor")), applied)
    check = check_drift(table, guard=_watch(warn))
    scaled = apply_drift(table, check, correct=correct, log=log, warn=warn, label=f"{table.path}: ")
    journal.note(key, {"factor": check.factor, "applied": scaled.meta.get("drift") if scaled.drifted else None})
    return scaled


def _watch(warn: Log) -> Any:
    """The quiet guard of a search's timings on this device: wait up to 20 s for a quiet machine, then warn."""
    from hwnas.latency.quiet import QuietGuard

    return QuietGuard(policy="warn", max_wait_s=20.0, log=lambda line: warn(line.strip().removeprefix("warning: ")))


def _evaluator(request: SearchRequest, supernet: Any, state: dict[str, Any]) -> tuple[Any, str]:
    from hwnas.data import Dataset, load_dataset
    from hwnas.data.readers import first_val_size
    from hwnas.evaluation import resolve_device
    from hwnas.search.evaluate import SupernetEvaluator

    space = supernet.space
    if isinstance(request.data, Dataset):
        dataset, data_spec = request.data, request.data.spec or request.data.name
    else:
        data_spec = request.data or str(state.get("dataset") or "fashion-mnist").split(" (", 1)[0]
        dataset = load_dataset(data_spec, val_size=first_val_size(request.val_size, state.get("val_size")), seed=0)
    if (dataset.in_channels, dataset.num_classes) != (space.in_channels, space.num_classes):
        raise HwnasError(f"dataset '{data_spec}' has {dataset.in_channels} channels and {dataset.num_classes} "
                         f"classes; the supernet expects {space.in_channels} and {space.num_classes}")
    evaluator = SupernetEvaluator(supernet, dataset.val, dataset.train, batch_size=request.batch_size,
                                  max_batches=request.val_batches, bn_batches=request.bn_batches,
                                  bn_batch_size=request.bn_batch_size, device=resolve_device(request.device),
                                  seed=request.seed)
    return evaluator, data_spec


def _strategy_options(request: SearchRequest) -> dict[str, Any]:
    """The options of the strategy that a request sets."""
    if request.strategy in ("evolution", "nsga"):
        return {} if request.patience is None else {"patience": request.patience}
    if request.strategy != "differentiable":
        return {}
    options: dict[str, Any] = {"finetune": request.finetune}
    if request.steps is not None:
        options["steps"] = request.steps
    if request.reward is not None:
        options["reward"] = request.reward
    return options


def _search_one(request: SearchRequest, space: Any, target: Target, user_budget: float,
                evaluator: JournaledEvaluator, seeds: list[Arch], out: Path, data_spec: str | None, name: str | None,
                journal: EvaluationJournal, log: Log, warn: Log) -> SearchOutcome:
    from hwnas.report import write_report

    searcher = get_strategy(request.strategy)
    table = target.model
    budget = user_budget * (1 - request.margin)  # the search aims under the guard band
    feasible = check_budget(space, table, budget, seed=request.seed)
    guard = f" (searched under {budget:.4g} ms: margin {request.margin:g})" if request.margin else ""
    log(f"space {space.name}: predicted latency {feasible.describe()}; budget {user_budget:g} ms{guard}")
    if budget >= feasible.high_ms:
        log("  (every subnet is within the budget: the search is unconstrained)")
    before = evaluator.evaluations
    context: dict[str, Any] = {
        # paths relative to best.json's folder: the record still names its files after the tree is copied
        "supernet": None if request.supernet is None else recorded_path(request.supernet, out),
        "table": target.label if target.table is None else recorded_path(target.label, out),
        "device_slug": target.device_slug, "dataset": data_spec,
        "validation_images": getattr(evaluator, "images", None), "val_size": request.val_size,
        "val_batches": request.val_batches, "batch_size": request.batch_size, "bn_batches": request.bn_batches,
        "bn_batch_size": request.bn_batch_size, "budget_ms": user_budget,
    }
    if target.table is not None and target.table.drifted:
        context["latency_drift"] = target.table.meta["drift"]
    if request.margin:
        context.update(margin=request.margin, search_budget_ms=budget)
    if request.seed_from is not None:
        context["seeded_from"] = f"{request.seed_from} ({len(seeds)} archs)"
    options: dict[str, Any] = {"seed": request.seed, "progress": request.progress, "time_limit_s": request.time_limit,
                               **_strategy_options(request)}
    if request.predictor:
        from hwnas.search.predictor import AccuracyPredictor

        n_confirm = request.confirm if request.confirm is not None else max(1, request.queries // 4)
        sample = random_search(space, evaluator, table, budget, queries=request.queries - n_confirm,
                               seed=request.seed, progress=request.progress, costs=False)
        pairs = sample.candidates.sort_values("accuracy", ascending=False)
        predictor = AccuracyPredictor(space, request.predictor_kind, seed=request.seed)
        fit = predictor.fit([sample.archs[a] for a in pairs["arch_id"]], pairs["accuracy"].to_numpy())
        log(fit.describe())
        context["predictor"] = fit.describe()
        options.update(queries=request.predictor_queries,
                       seed_population=seeds + [sample.archs[a] for a in pairs["arch_id"]])
        if request.strategy in ("evolution", "nsga"):
            options["population_size"] = request.population or 100
        result = searcher(space, predictor, table, budget, **options)
        result = confirm(result, evaluator, top_k=n_confirm, latency_model=table,
                         known=dict(zip(pairs["arch_id"], pairs["accuracy"], strict=True)))
    else:
        options.update(queries=request.queries, seed_population=seeds)
        if request.strategy in ("evolution", "nsga"):
            options["population_size"] = request.population or min(50, max(8, request.queries // 8))
        result = searcher(space, evaluator, table, budget, **options)
    context["supernet_evaluations"] = (evaluator.evaluations - before
                                       + int(result.info.get("supernet_evaluations") or 0))
    if journal.known_at_start:
        context["resumed"] = {"journal": str(journal.path), "replayed_evaluations": journal.replayed}
    if request.measure_top and result.best_row is not None:
        assert target.table is not None  # check() refuses --measure-top with a model of one's own
        result = _measured(result, target.table, budget, request.measure_top, log, warn)
        context["measured_pick"] = result.info["measured_pick"]
    if result.supernet_state is not None and request.supernet is not None:
        context["finetuned_supernet"] = recorded_path(_save_finetuned(request.supernet, result, out), out)
    record = RunRecord.from_result(result, **context)
    files = write_report(result, out, record)
    if result.best_row is None:
        log(f"no subnet within {budget:g} ms among {len(result.candidates)} candidates")
    else:
        row = result.best_row
        log(f"best arch {row['arch_id']} ({request.strategy}, {evaluator.evaluations - before} supernet "
            "evaluations):")
        log(f"  {json.dumps(record.arch)}")
        log(f"  predicted latency {row['latency_ms']:.4g} ms (budget {user_budget:g} ms{guard}), "
            f"validation accuracy {row[result.metric]:.2f} %")
    log(f"wrote {out}/: " + ", ".join(p.name for p in files.values()))
    log(f"  best:    {files['best.json']}")
    log(f"  summary: {files['summary.md']}")
    if record.finetuned_supernet is not None:
        weights = display_path(out / record.finetuned_supernet)
        log(f"  weights: {weights} (fine-tuned: export the best arch with these, "
            f"hwnas export --supernet {weights} --arch {files['best.json']})")
    return SearchOutcome(name=name, directory=out, target=target, budget_ms=user_budget, result=result, record=record,
                         files=files)


def _measured(result: SearchResult, table: LatencyTable, budget: float, top_k: int, log: Log, warn: Log
              ) -> SearchResult:
    """The search's result with its best re-chosen by timing the top candidates on this device."""
    from hwnas.latency.ondevice import subnet_timer
    from hwnas.search.measured import describe_pick, measured_pick

    result = measured_pick(result, subnet_timer(table, guard=_watch(warn)), budget, top_k=top_k)
    (log if result.info["measured_pick"]["met_budget"] else warn)(describe_pick(result))
    return result


def _save_finetuned(supernet_path: Path, result: SearchResult, out: Path) -> Path:
    """OUT/supernet.pt: the original checkpoint with the fine-tuned weights, loadable by load_supernet."""
    from hwnas.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(supernet_path)
    state["model"] = result.supernet_state
    state["finetuned_from"] = str(supernet_path)
    state["finetuned_by"] = {"strategy": result.strategy, "budget_ms": result.budget_ms, "seed": result.seed,
                             "steps": result.info.get("steps")}
    path = out / "supernet.pt"
    save_checkpoint(path, state)
    return path


def _write_family(out: Path, outcomes: list[SearchOutcome], evaluations: int, supernet: Path | None, log: Log
                  ) -> list[Path]:
    """family.json (what `hwnas export --arch OUT` reads) and family.md, one row per (device, budget)."""
    entries = []
    for o in outcomes:
        r = o.record
        table = o.target.label if o.target.table is None else recorded_path(o.target.label, out)
        entries.append(FamilyEntry(dir=str(o.name), table=table, device_slug=o.target.device_slug,
                                   profile=o.target.profile, budget_ms=o.budget_ms,
                                   best_arch_id=r.arch_id, predicted_latency_ms=r.predicted_latency_ms,
                                   accuracy=r.accuracy))
    family = write_family(out, entries)
    frame = pd.DataFrame([e.to_dict() for e in entries])[["device_slug", "profile", "budget_ms", "best_arch_id",
                                                          "predicted_latency_ms", "accuracy", "dir"]]
    text = frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    markdown = out / "family.md"
    atomic_write_text(markdown, "# Deploy family\n\nOne arch per (device, budget) from the same supernet "
                      f"({evaluations} supernet evaluations in all, shared through the cache).\n\n```\n{text}\n```\n")
    log(f"\ndeploy family ({len(entries)} searches, {evaluations} supernet evaluations):")
    log(text)
    hint = "" if supernet is None else \
        f"; export all with: hwnas export --supernet {display_path(supernet)} --arch {display_path(out)}"
    log(f"wrote {family} and {markdown}{hint}")
    return [family, markdown]


__all__ = ["DRIFT_MODES", "SearchOutcome", "SearchRequest", "SearchRun", "check_margin", "read_seed_population",
           "run_search"]
