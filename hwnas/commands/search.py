"""`hwnas search`: find the most accurate subnet of a supernet within a latency budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXAMPLE = """examples:
  hwnas search --supernet runs/fmnist/supernet.pt --table latency_tables/mbv3-32/DEVICE__cpu-onnxruntime.csv \\
      --budget-ms 2.5 --strategy evolution --queries 300 --out results/evo-2.5ms
  hwnas search --supernet S.pt --table T.csv --budget-ms 2.5 --strategy nsga --queries 300   # one front, many budgets
  hwnas search --supernet S.pt --table T.csv --budget-ms 2.5 --predictor --queries 200       # predictor for the bulk
  hwnas search --supernet S.pt --table T.csv --budget-ms 2.5 --strategy differentiable --finetune  # + OUT/supernet.pt
  hwnas search --supernet S.pt --table OTHER_DEVICE.csv --budget-ms 4 --seed-from results/evo-2.5ms
  hwnas search --supernet S.pt --table CPU.csv GPU.csv --budget-ms 1 2 4 --out results/family  # a deploy family

Accuracy is measured on the validation split (carved from the training set with seed 0, as
'hwnas train' carves it) after BN re-estimation on training batches; the test split is not touched.
Latency is the table's prediction; the budget is hard (no arch over it is ever returned), and a
budget below the fastest subnet is an error stating the feasible range. Writes OUT/candidates.csv,
pareto.csv, pareto.png, best.json (for 'hwnas export --arch'), history.csv and summary.md.
With several tables or budgets, one search per (table, budget) shares the supernet's cached
evaluations; each writes OUT/<device>__<profile>__<budget>ms/, and OUT/family.json and
OUT/family.md list them ('hwnas export --arch OUT' exports them all).
"""

STRATEGY_HELP = ("evolution (constrained, tournament), nsga (accuracy-latency front), differentiable (a learned "
                 "distribution over the choices, Lagrangian on the exact expected latency) or random (baseline)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "search",
        help="search a supernet for the most accurate subnet within a latency budget",
        description="Search the subnets of a trained supernet for the most accurate one whose latency, predicted "
        "by a latency table, is within the budget. Evolution keeps every candidate within the budget; NSGA "
        "returns the whole accuracy-latency front; differentiable search learns a distribution over the choices "
        "and repairs its argmax to fill the budget; random search is the baseline.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--supernet", type=Path, required=True, help="supernet checkpoint (hwnas train's OUT/supernet.pt)")
    add("--table", type=Path, required=True, nargs="+",
        help="latency table CSV (its .meta.json beside it); several (devices) search one arch per table and budget")
    add("--budget-ms", type=float, required=True, nargs="+",
        help="latency budget in milliseconds (hard); several search one arch per budget")
    add("--strategy", default="evolution", help=f"{STRATEGY_HELP} (default: %(default)s)")
    add("--queries", type=int, default=200,
        help="supernet evaluations in all (with --predictor: its training pairs plus the confirmations) "
             "(default: %(default)s)")
    add("--population", type=int, default=None,
        help="population size (default: queries/8 within 8..50; with --predictor 100)")
    add("--steps", type=int, default=None,
        help="differentiable: updates of the architecture logits (default: 10 * queries / 4; 200 with --finetune)")
    add("--reward", choices=("evaluator", "batch"), default=None,
        help="differentiable: accuracy of each sampled subnet after BN re-estimation (evaluator, default), or its "
             "loss on one validation batch (batch; cheap, noisier)")
    add("--finetune", action="store_true",
        help="differentiable: fine-tune the shared weights on the sampled subnets (implies --reward batch); "
             "writes OUT/supernet.pt, the weights to export the found subnet with")
    add("--data", default=None,
        help="dataset spec (default: the one the checkpoint was trained on, else fashion-mnist)")
    add("--val-size", type=int, default=5000,
        help="training images held out as validation split, as in hwnas train (default: %(default)s)")
    add("--val-batches", type=int, default=None, help="cap on validation batches per evaluation (default: all)")
    add("--batch-size", type=int, default=500, help="evaluation batch size (default: %(default)s)")
    add("--bn-batches", type=int, default=8,
        help="training batches that re-estimate BN before each evaluation (default: %(default)s)")
    add("--bn-batch-size", type=int, default=256, help="(default: %(default)s)")
    add("--predictor", action="store_true",
        help="fit an accuracy predictor on random subnets, search with it, confirm the best with the supernet")
    add("--predictor-kind", choices=("auto", "ridge", "mlp"), default="auto", help="(default: %(default)s)")
    add("--predictor-queries", type=int, default=10000,
        help="predictor evaluations of the search with --predictor (default: %(default)s)")
    add("--confirm", type=int, default=None,
        help="with --predictor: archs re-scored by the supernet (default: a quarter of --queries)")
    add("--seed-from", type=Path, default=None, metavar="DIR",
        help="start the population from an earlier run's pareto.csv (results/RUN)")
    add("--out", type=Path, default=None, help="run directory (default: results/<strategy>-<budget>ms-seed<S>)")
    add("--force", action="store_true", help="overwrite a run directory that holds an earlier search")
    add("--seed", type=int, default=0, help="(default: %(default)s)")
    add("--allow-mismatch", action="store_true", help="use a table measured for another space spec anyway")
    add("--margin", type=float, default=0.0,
        help="guard band: search under budget x (1 - MARGIN), e.g. 0.05 to keep 5 %% of the budget for the table's "
             "error and the device's noise; the budget itself is what best.json and the export check against "
             "(default: %(default)s)")
    add("--measure-top", type=int, default=0, metavar="K",
        help="on the table's own device: time the K most accurate in-budget candidates end to end at the end and "
             "return the most accurate one timed within the budget (0: off; default: %(default)s)")
    add("--drift", choices=("off", "warn", "correct"), default="off",
        help="on the table's own device: re-time a few of its calibration subnets first and warn when the device "
             "runs more than 5 %% faster or slower than when the table was measured (warn), or also scale the "
             "predictions by that factor (correct); see 'hwnas latency drift' (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _base_spec(spec: str) -> str:
    """'fashion-mnist (train subset 2048, seed 0)' -> 'fashion-mnist': the loadable part of a recorded spec."""
    return spec.split(" (", 1)[0]


def read_seed_population(run_dir: Path, space: Any) -> list[Any]:
    """The archs of an earlier run's front, refusing archs of another space by name."""
    from hwnas.errors import ArchError
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


def check_margin(margin: float) -> None:
    """--margin of search and demo: a guard band above half the budget would leave no search."""
    from hwnas.errors import HwnasError

    if not 0.0 <= margin < 0.5:
        raise HwnasError(f"--margin is a fraction of the budget in [0, 0.5), got {margin}")


def _check_args(args: argparse.Namespace) -> None:
    from hwnas.errors import HwnasError

    for name in ("queries", "batch_size", "bn_batches", "bn_batch_size", "predictor_queries", "val_size"):
        if getattr(args, name) < 1:
            raise HwnasError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("population", "val_batches"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "population" else 1):
            raise HwnasError(f"--{name.replace('_', '-')} is too small: {value}")
    check_margin(args.margin)
    if args.measure_top < 0:
        raise HwnasError(f"--measure-top must be >= 0, got {args.measure_top}")
    if args.confirm is not None and not 1 <= args.confirm < args.queries:
        raise HwnasError(f"--confirm must lie in 1..queries-1 ({args.queries - 1}), got {args.confirm}")
    if args.predictor and args.queries < 10:
        raise HwnasError(f"--predictor needs --queries >= 10 (training pairs plus confirmations), got {args.queries}")
    given = [name for name in ("steps", "reward") if getattr(args, name) is not None] + \
        (["finetune"] if args.finetune else [])
    if given and args.strategy != "differentiable":
        raise HwnasError(f"--{given[0]} applies to --strategy differentiable only")
    if args.steps is not None and args.steps < 0:
        raise HwnasError(f"--steps must be >= 0, got {args.steps}")
    if args.finetune and (args.predictor or args.reward == "evaluator"):
        raise HwnasError("--finetune scores subnets on batches with the weights it trains: it takes neither "
                         "--predictor nor --reward evaluator")


def run(args: argparse.Namespace) -> int:
    from hwnas.checkpoint import load_supernet
    from hwnas.errors import HwnasError
    from hwnas.latency.table import LatencyTable
    from hwnas.search import check_budget, get_strategy

    _check_args(args)
    searcher = get_strategy(args.strategy)
    tables = [LatencyTable.load(path) for path in args.table]
    supernet, state = load_supernet(args.supernet)
    space = supernet.space
    budgets = [float(b) for b in args.budget_ms]
    family = len(tables) * len(budgets) > 1
    for table in tables:
        for note in table.check_target(space, allow_mismatch=args.allow_mismatch):
            print(f"hwnas search: warning: {table.path}: {note}", file=sys.stderr)
    if args.drift != "off":
        tables = [_drift_checked(table, args.drift == "correct") for table in tables]
    for table in tables:
        for budget in budgets:  # every infeasible pair is refused before any evaluation
            check_budget(space, table, budget * (1 - args.margin), seed=args.seed)
    seeds = read_seed_population(args.seed_from, space) if args.seed_from is not None else []
    default = f"{args.strategy}-family-seed{args.seed}" if family else \
        f"{args.strategy}-{budgets[0]:g}ms-seed{args.seed}"
    out = args.out if args.out is not None else Path("results") / default
    marker = out / ("family.json" if family else "best.json")
    if marker.exists() and not args.force:
        raise HwnasError(f"{out} holds an earlier search ({marker.name}); pass --force to overwrite or choose --out")
    evaluator, data_spec = _evaluator(args, supernet, state)
    rows = []
    for table in tables:
        for budget in budgets:
            name = f"{table.device_slug}__{(table.profile_dict or {}).get('name', 'table')}__{budget:g}ms"
            run_dir = out / name if family else out
            if family:
                print(f"== {name}")
            result = _search_one(args, searcher, space, table, budget, evaluator, seeds, run_dir, data_spec)
            row = result.best_row
            rows.append({"dir": name, "table": str(table.path), "device_slug": table.device_slug,
                         "profile": (table.profile_dict or {}).get("name"), "budget_ms": budget,
                         "best_arch_id": None if row is None else row["arch_id"],
                         "predicted_latency_ms": None if row is None else float(row["latency_ms"]),
                         "accuracy": None if row is None else float(row[result.metric])})
    if family:
        _write_family(out, rows, evaluator.evaluations)
    return 0


def _measured(result: Any, table: Any, budget: float, top_k: int) -> Any:
    """The search's result with its best re-chosen by timing the top candidates on this device."""
    from hwnas.latency.ondevice import subnet_timer
    from hwnas.search.measured import describe_pick, measured_pick

    result = measured_pick(result, subnet_timer(table), budget, top_k=top_k)
    if result.info["measured_pick"]["met_budget"]:
        print(describe_pick(result))
    else:
        print(f"hwnas search: warning: {describe_pick(result)}", file=sys.stderr)
    return result


def _drift_checked(table: Any, correct: bool) -> Any:
    """The table, corrected by the measured drift when asked and the drift is beyond the tolerance."""
    from hwnas.latency.drift import check_drift, corrected

    check = check_drift(table)
    print(f"{table.path}: {check.describe()}")
    if not check.significant:
        return table
    if correct:
        print(f"  predictions scaled by {check.factor:.3f} for this search (recorded in best.json; the table is "
              "unchanged)")
        return corrected(table, check)
    print(f"hwnas search: warning: {table.path}: predictions may be off by about {(check.factor - 1) * 100:+.0f} % "
          "on this device now (--drift correct scales them; or profile again)", file=sys.stderr)
    return table


def _write_family(out: Path, rows: list[dict[str, Any]], evaluations: int) -> None:
    """family.json (what `hwnas export --arch OUT` reads) and family.md, one row per (device, budget)."""
    import pandas as pd

    from hwnas.fileio import atomic_write_text

    atomic_write_text(out / "family.json", json.dumps(rows, indent=2) + "\n")
    frame = pd.DataFrame(rows)[["device_slug", "profile", "budget_ms", "best_arch_id", "predicted_latency_ms",
                                "accuracy", "dir"]]
    text = frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    atomic_write_text(out / "family.md", "# Deploy family\n\nOne arch per (device, budget) from the same supernet "
                      f"({evaluations} supernet evaluations in all, shared through the cache).\n\n```\n{text}\n```\n")
    print(f"\ndeploy family ({len(rows)} searches, {evaluations} supernet evaluations):")
    print(text)
    print(f"wrote {out / 'family.json'} and {out / 'family.md'}; export all with: hwnas export --arch {out}")


def _evaluator(args: argparse.Namespace, supernet: Any, state: dict[str, Any]) -> tuple[Any, str]:
    from hwnas.data import load_dataset
    from hwnas.errors import HwnasError
    from hwnas.search.evaluate import SupernetEvaluator
    from hwnas.train import resolve_device

    space = supernet.space
    data_spec = args.data or _base_spec(str(state.get("dataset") or "fashion-mnist"))
    dataset = load_dataset(data_spec, val_size=args.val_size, seed=0)
    if (dataset.in_channels, dataset.num_classes) != (space.in_channels, space.num_classes):
        raise HwnasError(f"dataset '{data_spec}' has {dataset.in_channels} channels and {dataset.num_classes} "
                         f"classes; the supernet expects {space.in_channels} and {space.num_classes}")
    evaluator = SupernetEvaluator(supernet, dataset.val, dataset.train, batch_size=args.batch_size,
                                  max_batches=args.val_batches, bn_batches=args.bn_batches,
                                  bn_batch_size=args.bn_batch_size, device=resolve_device(args.device),
                                  seed=args.seed)
    return evaluator, data_spec


def _search_one(args: argparse.Namespace, searcher: Any, space: Any, table: Any, budget: float, evaluator: Any,
                seeds: list[Any], out: Path, data_spec: str) -> Any:
    from hwnas.search import check_budget, confirm, random_search

    user_budget, budget = budget, budget * (1 - args.margin)  # the search aims under the guard band
    feasible = check_budget(space, table, budget, seed=args.seed)
    guard = f" (searched under {budget:.4g} ms: margin {args.margin:g})" if args.margin else ""
    print(f"space {space.name}: predicted latency {feasible.describe()}; budget {user_budget:g} ms{guard}")
    if budget >= feasible.high_ms:
        print("  (every subnet is within the budget: the search is unconstrained)")
    before = evaluator.evaluations
    progress = not args.quiet
    context: dict[str, Any] = {
        "supernet": str(args.supernet), "table": str(table.path), "device_slug": table.device_slug,
        "dataset": data_spec, "validation_images": evaluator.images, "val_size": args.val_size,
        "val_batches": args.val_batches, "batch_size": args.batch_size, "bn_batches": args.bn_batches,
        "bn_batch_size": args.bn_batch_size,
    }
    if table.drifted:
        context["latency_drift"] = table.meta["drift"]
    if args.margin:
        context.update(budget_ms=user_budget, margin=args.margin, search_budget_ms=budget)
    if args.seed_from is not None:
        context["seeded_from"] = f"{args.seed_from} ({len(seeds)} archs)"
    if args.predictor:
        from hwnas.search.predictor import AccuracyPredictor

        n_confirm = args.confirm if args.confirm is not None else max(1, args.queries // 4)
        population = args.population or 100
        sample = random_search(space, evaluator, table, budget, queries=args.queries - n_confirm, seed=args.seed,
                               progress=progress, costs=False)
        pairs = sample.candidates.sort_values("accuracy", ascending=False)
        predictor = AccuracyPredictor(space, args.predictor_kind, seed=args.seed)
        fit = predictor.fit([sample.archs[a] for a in pairs["arch_id"]], pairs["accuracy"].to_numpy())
        print(fit.describe())
        context["predictor"] = fit.describe()
        options: dict[str, Any] = {"queries": args.predictor_queries, "seed": args.seed, "progress": progress,
                                   "seed_population": seeds + [sample.archs[a] for a in pairs["arch_id"]]}
        if args.strategy in ("evolution", "nsga"):
            options["population_size"] = population
        result = searcher(space, predictor, table, budget, **options, **_strategy_options(args))
        result = confirm(result, evaluator, top_k=n_confirm, latency_model=table,
                         known=dict(zip(pairs["arch_id"], pairs["accuracy"], strict=True)))
    else:
        population = args.population or min(50, max(8, args.queries // 8))
        options = {"queries": args.queries, "seed": args.seed, "seed_population": seeds, "progress": progress}
        if args.strategy in ("evolution", "nsga"):
            options["population_size"] = population
        result = searcher(space, evaluator, table, budget, **options, **_strategy_options(args))
    context["supernet_evaluations"] = evaluator.evaluations - before + int(result.info.get("supernet_evaluations") or 0)
    if args.measure_top and result.best_row is not None:
        result = _measured(result, table, budget, args.measure_top)
        context["measured_pick"] = result.info["measured_pick"]
    if result.supernet_state is not None:
        context["finetuned_supernet"] = str(_save_finetuned(args.supernet, result, out))

    from hwnas.report import write_report

    files = write_report(result, out, context)
    if result.best_row is None:
        print(f"no subnet within {budget:g} ms among {len(result.candidates)} candidates")
    else:
        row = result.best_row
        print(f"best arch {row['arch_id']} ({args.strategy}, {evaluator.evaluations - before} supernet "
              "evaluations):")
        print(f"  {json.dumps(json.loads(row['arch']))}")
        print(f"  predicted latency {row['latency_ms']:.4g} ms (budget {user_budget:g} ms{guard}), "
              f"validation accuracy {row[result.metric]:.2f} %")
    print(f"wrote {out}/: " + ", ".join(p.name for p in files.values()))
    print(f"  best:    {files['best.json']}")
    print(f"  summary: {files['summary.md']}")
    if "finetuned_supernet" in context:
        print(f"  weights: {context['finetuned_supernet']} (fine-tuned: export the best arch with these, "
              f"hwnas export --supernet {context['finetuned_supernet']} --arch {files['best.json']})")
    return result


def _strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of --strategy differentiable that the command line sets."""
    if args.strategy != "differentiable":
        return {}
    options: dict[str, Any] = {"finetune": args.finetune}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.reward is not None:
        options["reward"] = args.reward
    return options


def _save_finetuned(supernet_path: Path, result: Any, out: Path) -> Path:
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
