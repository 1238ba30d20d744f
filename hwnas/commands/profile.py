"""`hwnas profile`: time every block of a search space on a device and write its latency table."""

from __future__ import annotations

import argparse
from pathlib import Path

from hwnas.commands.busy import add_busy_arguments, guard_from_args

EXAMPLE = """examples:
  hwnas profile --profile profiles/cpu-onnxruntime.toml --space mbv3-32
  hwnas profile --profile profiles/h100-tensorrt-fp16.toml --space mbv3-224 --out latency_tables/ \\
      --calibration-subnets 50

A killed run resumes where it stopped when started again with the same arguments; the table's
metadata records the device fingerprint, and a table measured elsewhere is not resumed into.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "profile",
        help="measure every block of a search space on a device: the latency lookup table",
        description="Time every unique block of SPACE (stem and head included) on the backend of PROFILE, "
        "then time random whole subnets to calibrate the sum of blocks against end-to-end latency. "
        "Writes OUT/<space>/<device>__<profile>.csv with its .meta.json and .calibration.csv.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", required=True, help="device profile: a TOML file or the name of one in profiles/")
    parser.add_argument("--space", required=True, help="search space name (see 'hwnas demo' or hwnas.spaces.names())")
    parser.add_argument("--out", type=Path, default=Path("latency_tables"),
                        help="root of the tables (default: %(default)s)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start over instead of resuming an existing table")
    parser.add_argument("--calibration-subnets", type=int, default=30, metavar="N",
                        help="random whole subnets measured to calibrate the table (default: %(default)s; 0: none)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds per block at least, more (up to 8) until the quickest two "
                             "agree; the quickest is kept (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subnets (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_busy_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hwnas import spaces
    from hwnas.errors import HwnasError
    from hwnas.latency.profiler import profile_space
    from hwnas.latency.table import LatencyTable

    if args.calibration_subnets < 0 or args.rounds < 1:
        raise HwnasError("--calibration-subnets must be >= 0 and --rounds >= 1")
    space = spaces.get(args.space)
    path = profile_space(space, args.profile, args.out, resume=args.resume,
                         calibration_subnets=args.calibration_subnets, seed=args.seed, progress=not args.quiet,
                         rounds=args.rounds, guard=guard_from_args(args, "profile"))
    table = LatencyTable.load(path)
    low, high = table.latency_range(space)
    cal = table.calibration
    seconds = table.meta.get("profiling", {}).get("seconds", float("nan"))
    print(f"wrote {path} ({len(table)} blocks, {seconds:.1f} s of profiling in all)")
    print(f"  metadata:    {path.with_name(path.stem + '.meta.json')}")
    if cal.get("n_subnets"):
        resid = cal.get("residuals", {})
        print(f"  calibration: {path.with_name(path.stem + '.calibration.csv')} ({cal['kind']} on "
              f"{cal['n_subnets']} subnets, in-sample MAPE {resid.get('mape_pct', float('nan')):.2f} %)")
    print(f"  predicted latency range of {space.name}: {low:.3f} .. {high:.3f} ms")
    return 0
