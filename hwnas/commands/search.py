"""`hwnas search`: find the most accurate subnet of a supernet within a latency budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwnas.search.request import SearchRequest

EXAMPLE = """examples:
  hwnas search --supernet runs/fmnist/supernet.pt --table latency_tables/mbv3-32/DEVICE__cpu-onnxruntime.csv \\
      --budget-ms 2.5 --strategy evolution --queries 300 --out results/evo-2.5ms
  hwnas search --supernet S.pt --table T.csv --budget-ms 2.5 --strategy nsga --queries 300   # one front, many budgets
  hwnas search --supernet S.pt --table T.csv --budget-ms 2.5 --predictor --queries 200       # predictor for the bulk
  hwnas search --supernet S.pt --table T.csv --budget-ms 2.5 --strategy differentiable --finetune  # + OUT/supernet.pt
  hwnas search --supernet S.pt --table OTHER_DEVICE.csv --budget-ms 4 --seed-from results/evo-2.5ms
  hwnas search --supernet S.pt --table CPU.csv GPU.csv --budget-ms 1 2 4 --out results/family  # a deploy family
  hwnas search --supernet S.pt --table CPU.csv:2,4 GPU.csv:0.3 --out results/family   # budgets per device
  hwnas search ... --out results/evo-2.5ms --resume        # after a kill: replays what was evaluated, continues
  hwnas search --space hwnas.examples.cell_space:space --evaluator hwnas.examples.cell_space:evaluator \
      --latency hwnas.examples.cell_space:latency --budget-ms 3 --out results/cell   # a space of your own

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
    from hwnas.commands.train import val_size_arg  # the same N|F reading as hwnas train's

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
    add("--supernet", type=Path, default=None,
        help="supernet checkpoint (hwnas train's OUT/supernet.pt): scores the archs (or --evaluator)")
    add("--table", nargs="+", default=[], metavar="CSV[:MS,...]",
        help="latency table CSV (its .meta.json beside it); several (devices) search one arch per table and budget "
             "(or --latency); CSV:MS,MS gives that table budgets of its own instead of --budget-ms")
    add("--space", default=None,
        help="the space: a preset or package.module:factory of your own (default: the supernet's); see "
             "hwnas/examples/cell_space.py for what a space provides")
    add("--evaluator", default=None, metavar="MODULE:FACTORY",
        help="score archs with your own evaluator (called with the space; .evaluate(arch) -> accuracy) instead of a "
             "supernet")
    add("--latency", default=None, metavar="MODULE:FACTORY",
        help="predict latency with your own model (called with the space; .predict(arch) -> ms) instead of a table")
    add("--budget-ms", type=float, default=[], nargs="+",
        help="latency budget in milliseconds (hard); several search one arch per budget; applies to every --table "
             "that gives none of its own")
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
    add("--val-size", type=val_size_arg, default=None, metavar="N|F",
        help="training images held out as the validation split (a count, or a fraction below 1), as in hwnas "
             "train (default: what the checkpoint was trained with, else 5000)")
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
    add("--resume", action="store_true",
        help="continue a search that was killed, from OUT/search_journal.json: the evaluations it paid for are "
             "replayed, so it takes the same trajectory as an uninterrupted run (same settings needed)")
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
    add("--time-limit", type=float, default=None, metavar="SECONDS",
        help="stop each search at its next generation once this many seconds are spent (default: no limit)")
    add("--patience", type=int, default=None, metavar="GENERATIONS",
        help="evolution / nsga: stop once this many generations found no better arch within the budget "
             "(default: run every query)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def request_from_args(args: argparse.Namespace) -> SearchRequest:
    """The library request that the arguments describe."""
    from hwnas.search.request import SearchRequest, parse_table_budgets

    parsed = [parse_table_budgets(value) for value in args.table]
    own = [budgets for _, budgets in parsed]
    return SearchRequest(
        supernet=args.supernet, tables=[path for path, _ in parsed], budgets_ms=args.budget_ms, space=args.space,
        table_budgets_ms=own if any(b is not None for b in own) else [],
        evaluator=args.evaluator, latency=args.latency, time_limit=args.time_limit, patience=args.patience,
        strategy=args.strategy,
        queries=args.queries, population=args.population, steps=args.steps, reward=args.reward,
        finetune=args.finetune, data=args.data, val_size=args.val_size, val_batches=args.val_batches,
        batch_size=args.batch_size, bn_batches=args.bn_batches, bn_batch_size=args.bn_batch_size,
        predictor=args.predictor, predictor_kind=args.predictor_kind, predictor_queries=args.predictor_queries,
        confirm=args.confirm, seed_from=args.seed_from, out=args.out, force=args.force, resume=args.resume,
        seed=args.seed, allow_mismatch=args.allow_mismatch, margin=args.margin, measure_top=args.measure_top,
        drift=args.drift, device=args.device, progress=not args.quiet)


def run(args: argparse.Namespace) -> int:
    from hwnas.search.pipeline import run_search

    run_search(request_from_args(args), log=print,
               warn=lambda message: print(f"hwnas search: warning: {message}", file=sys.stderr))
    return 0
