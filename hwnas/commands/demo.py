"""`hwnas demo`: profile this CPU, search the shipped Fashion-MNIST supernet under a budget, export and verify.

The README's first command: the whole product on the embedded default in a few minutes on a
2-core CPU, ending in a table of budget, predicted and measured latency, accuracy and files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

SPACE = "mbv3-32"
PROFILE = "cpu-onnxruntime"
SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "mbv3-32_fashion-mnist.pt"
REPO_TABLES = Path(__file__).resolve().parent.parent.parent / "latency_tables"

EXAMPLE = """examples:
  hwnas demo                          # profile (or reuse a matching table), search, export, verify
  hwnas demo --budget-ms 0.8          # your own budget (ms, ONNX Runtime, batch 1, 1 thread)
  hwnas demo --train-minutes 20       # train a supernet here first instead of using the shipped one
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="the whole pipeline on Fashion-MNIST: profile this CPU, search under a budget, export and verify",
        description="Profile this CPU with ONNX Runtime for the small space (or reuse the committed table when its "
        "fingerprint matches), load the shipped Fashion-MNIST supernet, search under a latency budget, export the "
        "best subnet to ONNX, verify it in ONNX Runtime, time it and print a summary.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--budget-ms", type=float, default=None,
        help="latency budget (default: the median predicted latency of 1000 random subnets)")
    add("--supernet", type=Path, default=None, help=f"supernet checkpoint (default: the shipped {SHIPPED.name})")
    add("--train-minutes", type=float, default=None, help="train a supernet for this long instead (CPU: >= 20)")
    add("--data", default="fashion-mnist", help="dataset spec (default: %(default)s)")
    add("--profile", default=PROFILE, help="device profile name or TOML (default: %(default)s)")
    add("--queries", type=int, default=48, help="supernet evaluations of the search (default: %(default)s)")
    add("--val-images", type=int, default=1000,
        help="validation images per evaluation in the search (default: %(default)s)")
    add("--margin", type=float, default=0.0,
        help="guard band: search under budget x (1 - MARGIN) (default: %(default)s)")
    add("--measure-top", type=int, default=5, metavar="K",
        help="time the K most accurate in-budget candidates here and keep the best one timed within the budget "
             "(0: trust the table; default: %(default)s)")
    add("--seed", type=int, default=0, help="(default: %(default)s)")
    add("--out", type=Path, default=Path("results/demo"), help="where everything goes (default: %(default)s)")
    add("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def find_table(space: Any, profile: Any, out: Path, progress: bool) -> tuple[Any, str]:
    """A table for this CPU: the committed one when its fingerprint matches, else one profiled now (resumable)."""
    from hwnas.errors import LatencyTableError
    from hwnas.latency.device import device_slug, fingerprint
    from hwnas.latency.profiler import profile_space, table_path
    from hwnas.latency.table import LatencyTable

    fp = fingerprint(profile)
    slug = device_slug(fp)
    committed = table_path(REPO_TABLES, space, profile, slug)
    if committed.is_file():
        table = LatencyTable.load(committed)
        try:
            notes = table.check_target(space, profile, fp)
        except LatencyTableError as exc:
            print(f"  committed table not used: {exc}")
        else:
            return table, f"reused {committed} (fingerprint matches{'; ' + '; '.join(notes) if notes else ''})"
    started = time.perf_counter()
    print(f"  no table for this device ({slug}) and profile: profiling {space.name} now (about a minute)")
    path = profile_space(space, profile, out / "latency_tables", resume=True, progress=progress)
    return LatencyTable.load(path), f"profiled here in {time.perf_counter() - started:.0f} s: {path}"


def drift_corrected(table: Any) -> Any:
    """A committed table re-checked on this machine, scaled when the machine runs faster or slower now.

    The fingerprint matched, but a shared VM's speed wanders by more than the table's error (up to 14 %,
    once 50 %, within a day on the development VM); the demo's budget is checked against the device as it is.
    """
    from hwnas.latency.drift import check_drift, corrected

    check = check_drift(table)
    print(f"  drift: {check.describe()}")
    if not check.significant:
        return table
    print(f"  predictions scaled by {check.factor:.3f} for this run (the committed table is unchanged)")
    return corrected(table, check)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from hwnas import spaces
    from hwnas.checkpoint import load_supernet
    from hwnas.commands.export import summary_table
    from hwnas.commands.search import check_margin
    from hwnas.data import load_dataset
    from hwnas.deploy import EvalSettings, deploy
    from hwnas.errors import HwnasError
    from hwnas.latency.profiles import load_profile
    from hwnas.report import write_report
    from hwnas.search import check_budget, evolution_search
    from hwnas.search.evaluate import SupernetEvaluator

    clock = time.perf_counter()
    progress = not args.quiet
    if args.queries < 4 or args.measure_top < 0:
        raise HwnasError(f"--queries must be >= 4 and --measure-top >= 0, got {args.queries} and {args.measure_top}")
    check_margin(args.margin)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    space = spaces.get(SPACE)
    profile = load_profile(args.profile)

    print(f"[1/5] latency table ({profile.name}: {profile.description})")
    table, how = find_table(space, profile, out, progress)
    print(f"  {how}")
    if how.startswith("reused"):
        table = drift_corrected(table)

    print("[2/5] supernet")
    dataset = load_dataset(args.data, val_size=5000, seed=0)
    if args.train_minutes is not None:
        from hwnas.train import TrainConfig, train_supernet

        config = TrainConfig(epochs=40, batch_size=128, lr=0.1, num_sampled=1, warmup_epochs=0.5, device="cpu")
        ckpt = train_supernet(space, dataset, config, out / "train", resume=True, progress=progress,
                              time_budget=args.train_minutes * 60)
    else:
        ckpt = args.supernet or SHIPPED
        if not ckpt.is_file():
            raise HwnasError(f"{ckpt}: no supernet checkpoint; pass --supernet CKPT or --train-minutes N")
    supernet, state = load_supernet(ckpt, space_name=SPACE)
    print(f"  {ckpt} ({state.get('dataset', '?')}, epoch {state.get('epoch', '?')})")

    print("[3/5] budget")
    feasible = check_budget(space, table, args.budget_ms if args.budget_ms is not None else 1e9, seed=args.seed)
    if args.budget_ms is None:
        rng = np.random.default_rng(args.seed)
        budget = float(np.median(table.predict_many([space.sample(rng) for _ in range(1000)])))
        budget = float(f"{budget:.3g}")
        print(f"  {budget:g} ms: the median predicted latency of 1000 random subnets (feasible "
              f"{feasible.describe()}); --budget-ms overrides")
    else:
        budget = float(args.budget_ms)
        print(f"  {budget:g} ms (given); feasible {feasible.describe()}")
    target = budget * (1 - args.margin)
    if args.margin:
        check_budget(space, table, target, seed=args.seed)
        print(f"  searched under {target:.4g} ms: a margin of {args.margin:g} for the table's error and this "
              "device's noise")

    print(f"[4/5] search: constrained evolution, {args.queries} supernet evaluations on {args.val_images} "
          "validation images")
    settings = EvalSettings(bn_batches=4, bn_batch_size=256, seed=args.seed, batch_size=500,
                            val_batches=max(1, args.val_images // 500))
    evaluator = SupernetEvaluator(supernet, dataset.val, dataset.train, batch_size=settings.batch_size,
                                  max_batches=settings.val_batches, bn_batches=settings.bn_batches,
                                  bn_batch_size=settings.bn_batch_size, device="cpu", seed=args.seed)
    result = evolution_search(space, evaluator, table, target, queries=args.queries,
                              population_size=max(4, min(16, args.queries // 3)), seed=args.seed, progress=progress)
    if result.best_row is not None and args.measure_top:
        from hwnas.latency.ondevice import subnet_timer
        from hwnas.search.measured import describe_pick, measured_pick

        result = measured_pick(result, subnet_timer(table), target, top_k=args.measure_top)
        print(f"  {describe_pick(result)}")
    context = {"supernet": str(ckpt), "table": str(table.path), "device_slug": table.device_slug,
               "dataset": args.data, "validation_images": evaluator.images, "val_size": 5000,
               "val_batches": settings.val_batches, "batch_size": settings.batch_size,
               "bn_batches": settings.bn_batches, "bn_batch_size": settings.bn_batch_size}
    if table.drifted:
        context["latency_drift"] = table.meta["drift"]
    if args.margin:
        context.update(budget_ms=budget, margin=args.margin, search_budget_ms=target)
    if "measured_pick" in result.info:
        context["measured_pick"] = result.info["measured_pick"]
    write_report(result, out / "search", context)
    row = result.best_row
    if row is None:
        raise HwnasError(f"the search found no subnet within {target:g} ms")
    best = result.best
    print(f"  best {row['arch_id']}: predicted {row['latency_ms']:.4g} ms, validation accuracy "
          f"{row['accuracy']:.2f} % ({len(result.candidates)} candidates; {out / 'search'})")

    print("[5/5] export, verify and measure")
    report = deploy(supernet, best, out / "export", dataset=dataset, settings=settings, profile=profile, table=table,
                    budget_ms=budget, search_accuracy=float(row["accuracy"]),
                    metadata={"source": str(ckpt), "search": str(out / "search")})
    minutes = (time.perf_counter() - clock) / 60
    print()
    print(summary_table([report]))
    print(f"\nvalidation accuracy: search {report.search_accuracy:.2f} %, exported model {report.val_accuracy:.2f} % "
          f"({evaluator.images} images, same BN statistics)")
    print(f"files: {out / 'search'}/ (candidates.csv, pareto.png, best.json, summary.md), "
          f"{report.onnx_path}, {out / 'export' / 'deploy.json'}")
    print(f"demo finished in {minutes:.1f} min")
    if report.warnings:
        print(f"{len(report.warnings)} warning(s) above", file=sys.stderr)
    return 0
