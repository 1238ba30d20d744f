"""`hwnas latency validate`: measure random subnets end to end and score a latency table on them."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """examples:
  hwnas latency validate --table latency_tables/mbv3-32/DEVICE__cpu-onnxruntime.csv --n 200
  hwnas latency validate --table T.csv --n 50 --out results/validation --allow-mismatch

Prints the share of subnets predicted within +-5 % and +-10 %, MAPE, Kendall tau and the worst error,
beside the same figures for a FLOPs proxy; writes validation.csv, validation.png and validation.json.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "latency",
        help="latency tables: validate a table against end-to-end measurements",
        description="Work with latency tables. 'validate' measures random subnets on the table's own backend "
        "and compares them with the table's predictions.",
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
                          help="interleaved timing rounds per subnet; the quietest is kept (default: %(default)s)")
    validate.add_argument("--out", type=Path, help="output directory (default: <table>.validation/ beside the table)")
    validate.add_argument("--allow-mismatch", action="store_true",
                          help="measure even if this device or the table's space differs from the table's")
    validate.add_argument("--no-measure", dest="measure", action="store_false",
                          help="measure nothing: score what an interrupted validation left in --out (on any machine)")
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.set_defaults(run=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from hwnas.errors import HwnasError
    from hwnas.latency.table import LatencyTable
    from hwnas.latency.validate import print_report, validate_table

    if args.n < 2 or args.rounds < 1:
        raise HwnasError("--n must be >= 2 and --rounds >= 1")
    table = LatencyTable.load(args.table)
    out = args.out if args.out is not None else args.table.with_name(args.table.stem + ".validation")
    report = validate_table(table, n=args.n, seed=args.seed, out_dir=out, allow_mismatch=args.allow_mismatch,
                            rounds=args.rounds, progress=not args.quiet, measure=args.measure)
    print_report(report)
    print(f"wrote {report.files['csv']}, {report.files['png']} and {report.files['json']}")
    return 0
