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
  hwnas search --supernet S.pt --table OTHER_DEVICE.csv --budget-ms 4 --seed-from results/evo-2.5ms

Accuracy is measured on the validation split (carved from the training set with seed 0, as
'hwnas train' carves it) after BN re-estimation on training batches; the test split is not touched.
Latency is the table's prediction; the budget is hard (no arch over it is ever returned), and a
budget below the fastest subnet is an error stating the feasible range. Writes OUT/candidates.csv,
pareto.csv, pareto.png, best.json (for 'hwnas export --arch'), history.csv and summary.md.
"""

STRATEGY_HELP = "evolution (constrained, tournament), nsga (accuracy-latency front) or random (baseline)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "search",
        help="search a supernet for the most accurate subnet within a latency budget",
        description="Search the subnets of a trained supernet for the most accurate one whose latency, predicted "
        "by a latency table, is within the budget. Evolution keeps every candidate within the budget; NSGA "
        "returns the whole accuracy-latency front; random search is the baseline.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--supernet", type=Path, required=True, help="supernet checkpoint (hwnas train's OUT/supernet.pt)")
    add("--table", type=Path, required=True, help="latency table CSV (its .meta.json beside it)")
    add("--budget-ms", type=float, required=True, help="latency budget in milliseconds (hard)")
    add("--strategy", default="evolution", help=f"{STRATEGY_HELP} (default: %(default)s)")
    add("--queries", type=int, default=200,
        help="supernet evaluations in all (with --predictor: its training pairs plus the confirmations) "
             "(default: %(default)s)")
    add("--population", type=int, default=None,
        help="population size (default: queries/8 within 8..50; with --predictor 100)")
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


def _check_args(args: argparse.Namespace) -> None:
    from hwnas.errors import HwnasError

    for name in ("queries", "batch_size", "bn_batches", "bn_batch_size", "predictor_queries", "val_size"):
        if getattr(args, name) < 1:
            raise HwnasError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("population", "val_batches"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "population" else 1):
            raise HwnasError(f"--{name.replace('_', '-')} is too small: {value}")
    if args.confirm is not None and not 1 <= args.confirm < args.queries:
        raise HwnasError(f"--confirm must lie in 1..queries-1 ({args.queries - 1}), got {args.confirm}")
    if args.predictor and args.queries < 10:
        raise HwnasError(f"--predictor needs --queries >= 10 (training pairs plus confirmations), got {args.queries}")


def run(args: argparse.Namespace) -> int:
    from hwnas.checkpoint import load_supernet
    from hwnas.errors import HwnasError
    from hwnas.latency.table import LatencyTable
    from hwnas.search import check_budget, confirm, get_strategy, random_search
    from hwnas.search.evaluate import SupernetEvaluator

    _check_args(args)
    searcher = get_strategy(args.strategy)
    table = LatencyTable.load(args.table)
    supernet, state = load_supernet(args.supernet)
    space = supernet.space
    for note in table.check_target(space, allow_mismatch=args.allow_mismatch):
        print(f"hwnas search: warning: {note}", file=sys.stderr)
    budget = float(args.budget_ms)
    feasible = check_budget(space, table, budget, seed=args.seed)
    print(f"space {space.name}: predicted latency {feasible.describe()}; budget {budget:g} ms")
    if budget >= feasible.high_ms:
        print("  (every subnet is within the budget: the search is unconstrained)")
    seeds = read_seed_population(args.seed_from, space) if args.seed_from is not None else []
    out = args.out if args.out is not None else Path("results") / f"{args.strategy}-{budget:g}ms-seed{args.seed}"
    if (out / "best.json").exists() and not args.force:
        raise HwnasError(f"{out} holds an earlier search (best.json); pass --force to overwrite or choose --out")

    from hwnas.data import load_dataset
    from hwnas.train import resolve_device

    data_spec = args.data or _base_spec(str(state.get("dataset") or "fashion-mnist"))
    dataset = load_dataset(data_spec, val_size=args.val_size, seed=0)
    if (dataset.in_channels, dataset.num_classes) != (space.in_channels, space.num_classes):
        raise HwnasError(f"dataset '{data_spec}' has {dataset.in_channels} channels and {dataset.num_classes} "
                         f"classes; the supernet expects {space.in_channels} and {space.num_classes}")
    evaluator = SupernetEvaluator(supernet, dataset.val, dataset.train, batch_size=args.batch_size,
                                  max_batches=args.val_batches, bn_batches=args.bn_batches,
                                  bn_batch_size=args.bn_batch_size, device=resolve_device(args.device),
                                  seed=args.seed)
    progress = not args.quiet
    context: dict[str, Any] = {
        "supernet": str(args.supernet), "table": str(table.path), "device_slug": table.device_slug,
        "dataset": data_spec, "validation_images": evaluator.images, "bn_batches": args.bn_batches,
    }
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
        if args.strategy != "random":
            options["population_size"] = population
        result = searcher(space, predictor, table, budget, **options)
        result = confirm(result, evaluator, top_k=n_confirm, latency_model=table,
                         known=dict(zip(pairs["arch_id"], pairs["accuracy"], strict=True)))
    else:
        population = args.population or min(50, max(8, args.queries // 8))
        options = {"queries": args.queries, "seed": args.seed, "seed_population": seeds, "progress": progress}
        if args.strategy != "random":
            options["population_size"] = population
        result = searcher(space, evaluator, table, budget, **options)
    context["supernet_evaluations"] = evaluator.evaluations

    from hwnas.report import write_report

    files = write_report(result, out, context)
    if result.best_row is None:
        print(f"no subnet within {budget:g} ms among {len(result.candidates)} candidates")
    else:
        row = result.best_row
        print(f"best arch {row['arch_id']} ({args.strategy}, {evaluator.evaluations} supernet evaluations):")
        print(f"  {json.dumps(json.loads(row['arch']))}")
        print(f"  predicted latency {row['latency_ms']:.4g} ms (budget {budget:g} ms), "
              f"validation accuracy {row[result.metric]:.2f} %")
    print(f"wrote {out}/: " + ", ".join(p.name for p in files.values()))
    print(f"  best:    {files['best.json']}")
    print(f"  summary: {files['summary.md']}")
    return 0
