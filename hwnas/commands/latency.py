"""`hwnas latency validate | drift`: score a latency table against end-to-end measurements, now or as it was."""

from __future__ import annotations

import argparse
from pathlib import Path

from hwnas.commands.busy import add_busy_arguments, guard_from_args

EXAMPLE = """examples:
  hwnas latency validate --table latency_tables/mbv3-32/DEVICE__cpu-onnxruntime.csv --n 200
  hwnas latency validate --table T.csv --n 50 --out results/validation --allow-mismatch
  hwnas latency drift --table latency_tables/mbv3-32/DEVICE__cpu-onnxruntime.csv

validate prints the share of subnets predicted within +-5 % and +-10 %, MAPE, Kendall tau and the
worst error, beside the same figures for a FLOPs proxy; writes validation.csv, validation.png and
validation.json. drift re-times a few of the table's calibration subnets and prints how much slower
(or faster) this device runs now than when the table was measured ('hwnas search --drift correct'
searches for the device as it runs now).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "latency",
        help="latency tables: validate a table against end-to-end measurements, or check it for drift",
        description="Work with latency tables. 'validate' measures random subnets on the table's own backend "
        "and compares them with the table's predictions; 'drift' re-times a few of its calibration subnets to "
        "tell whether the device still runs as fast as when the table was measured.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    validate = actions.add_parser(
        "validate",
        help="measure N random subnets end to end and compare with the table's predictions",
        description="Measure N random subnets (not the calibration ones) end to end on the table's backend and "
        "compare with its predictions: within +-5 % / +-10 %, MAPE, Kendall tau, max error, beside a FLOPs proxy.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("--table", required=True, type=Path, help="the table's CSV (its .meta.json beside it)")
    validate.add_argument("--n", type=int, default=200, help="random subnets to measure (default: %(default)s)")
    validate.add_argument("--seed", type=int, default=1, help="seed of the subnets (default: %(default)s)")
    validate.add_argument("--rounds", type=int, default=3,
                          help="interleaved timing rounds per subnet at least, more (up to 8) until the quickest two "
                               "agree; the quickest is kept (default: %(default)s)")
    validate.add_argument("--out", type=Path, help="output directory (default: <table>.validation/ beside the table)")
    validate.add_argument("--allow-mismatch", action="store_true",
                          help="measure even if this device or the table's space differs from the table's")
    validate.add_argument("--no-measure", dest="measure", action="store_false",
                          help="measure nothing: score what an interrupted validation left in --out (on any machine)")
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    add_busy_arguments(validate)
    validate.set_defaults(run=run_validate)

    drift = actions.add_parser(
        "drift",
        help="re-time a few of the table's calibration subnets: is this device as fast as when it was profiled?",
        description="Re-time N of the table's calibration subnets on this machine, the way the profiler timed them, "
        "and print the median ratio now / then. A shared or throttled machine keeps its fingerprint while its "
        "speed changes; a ratio beyond the tolerance means predictions are off by about that much.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    drift.add_argument("--table", required=True, type=Path, help="the table's CSV (its .meta.json beside it)")
    drift.add_argument("--anchors", type=int, default=8, help="calibration subnets to re-time (default: %(default)s)")
    drift.add_argument("--rounds", type=int, default=3,
                       help="interleaved timing rounds per subnet at least, more (up to 8) until the quickest two "
                            "agree; the quickest is kept (default: %(default)s)")
    drift.add_argument("--tolerance", type=float, default=0.05,
                       help="relative change reported as drift (default: %(default)s)")
    add_busy_arguments(drift)
    drift.set_defaults(run=run_drift)


def run_validate(args: argparse.Namespace) -> int:
    from hwnas.errors import HwnasError
    from hwnas.latency.table import LatencyTable
    from hwnas.latency.validate import print_report, validate_table

    if args.n < 2 or args.rounds < 1:
        raise HwnasError("--n must be >= 2 and --rounds >= 1")
    table = LatencyTable.load(args.table)
    out = args.out if args.out is not None else args.table.with_name(args.table.stem + ".validation")
    report = validate_table(table, n=args.n, seed=args.seed, out_dir=out, allow_mismatch=args.allow_mismatch,
                            rounds=args.rounds, progress=not args.quiet, measure=args.measure,
                            guard=guard_from_args(args, "latency validate") if args.measure else None)
    print_report(report)
    print(f"wrote {out / report.files['csv']}, {out / report.files['png']} and {out / report.files['json']}")
    return 0


def run_drift(args: argparse.Namespace) -> int:
    from hwnas.errors import HwnasError
    from hwnas.latency.drift import check_drift
    from hwnas.latency.table import LatencyTable

    if args.anchors < 1 or args.rounds < 1 or not 0 < args.tolerance < 1:
        raise HwnasError("--anchors and --rounds must be >= 1 and --tolerance within (0, 1)")
    table = LatencyTable.load(args.table)
    check = check_drift(table, n=args.anchors, rounds=args.rounds, tolerance=args.tolerance,
                        guard=guard_from_args(args, "latency drift"))
    print(f"{table.path}: {check.describe()}")
    for arch_id, then, now in zip(check.arch_ids, check.then_ms, check.now_ms, strict=True):
        print(f"  {arch_id}: {then:.4g} ms then, {now:.4g} ms now ({now / then:.3f}x)")
    if check.advice:
        print(f"  {check.advice}")
    return 0
