"""`hwnas demo`: profile this CPU, search the shipped Fashion-MNIST supernet under a budget, export and verify.

The README's first command: the whole product on the embedded default in a few minutes on a
2-core CPU, ending in a table of budget, predicted and measured latency, accuracy and files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    add("--supernet", type=Path, default=None,
        help="supernet checkpoint (default: the shipped mbv3-32_fashion-mnist.pt)")
    add("--train-minutes", type=float, default=None, help="train a supernet for this long instead (CPU: >= 20)")
    add("--data", default="fashion-mnist", help="dataset spec (default: %(default)s)")
    add("--profile", default="cpu-onnxruntime", help="device profile name or TOML (default: %(default)s)")
    add("--queries", type=int, default=48, help="supernet evaluations of the search (default: %(default)s)")
    add("--val-images", type=int, default=1000,
        help="validation images per evaluation in the search (default: %(default)s)")
    add("--margin", type=float, default=0.0,
        help="guard band: search under budget x (1 - MARGIN) (default: %(default)s)")
    add("--measure-top", type=int, default=5, metavar="K",
        help="time the K most accurate in-budget candidates here and keep the best one timed within the budget "
             "(0: trust the table; default: %(default)s)")
    add("--drift", choices=("correct", "off"), default="correct",
        help="a committed table: re-time a few of its calibration subnets and scale its predictions by how much "
             "faster or slower this machine runs now (correct), or trust it as profiled (off) (default: %(default)s)")
    add("--seed", type=int, default=0, help="(default: %(default)s)")
    add("--out", type=Path, default=Path("results/demo"), help="where everything goes (default: %(default)s)")
    add("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hwnas.demo import DemoRequest, run_demo
    from hwnas.deploy import summary_table

    outcome = run_demo(DemoRequest(
        budget_ms=args.budget_ms, supernet=args.supernet, train_minutes=args.train_minutes, data=args.data,
        profile=args.profile, queries=args.queries, val_images=args.val_images, margin=args.margin,
        measure_top=args.measure_top, drift=args.drift == "correct", seed=args.seed, out=args.out,
        progress=not args.quiet),
        log=print, warn=lambda message: print(f"hwnas demo: warning: {message}", file=sys.stderr))
    report, search = outcome.report, outcome.search
    print()
    print(summary_table([report]))
    print(f"\nvalidation accuracy: search {report.search_accuracy:.2f} %, exported model {report.val_accuracy:.2f} % "
          f"({outcome.validation_images} images, same BN statistics)")
    print(f"files: {search.directory}/ (candidates.csv, pareto.png, best.json, summary.md), "
          f"{report.onnx_path}, {args.out / 'export' / 'deploy.json'}")
    print(f"demo finished in {outcome.minutes:.1f} min")
    if report.warnings:
        print(f"{len(report.warnings)} warning(s) above", file=sys.stderr)
    return 0
