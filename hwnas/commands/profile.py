"""`hwnas profile`: time every block of a search space on a device and write its latency table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from hwnas.commands.busy import add_busy_arguments, guard_from_args

if TYPE_CHECKING:
    from hwnas.space import SearchSpace

EXAMPLE = """examples:
  hwnas profile --profile profiles/cpu-onnxruntime.toml --space mbv3-32
  hwnas profile --profile cpu-onnxruntime --space mbv3-32 --in-channels 3 --num-classes 4   # an RGB 4-class dataset
  hwnas profile --profile cpu-onnxruntime --like runs/pets/supernet.pt   # the shape (and space) a supernet has
  hwnas profile --profile profiles/h100-tensorrt-fp16.toml --space mbv3-224 --out latency_tables/ \\
      --calibration-subnets 50

A table of another shape than the preset's default (mbv3-32: 1 channel, 10 classes) is written as
OUT/<space>/<device>__<profile>__in<C>-cls<K>.csv, beside the default-shaped one, never over it.
A killed run resumes where it stopped when started again with the same arguments; the table's
metadata records the space (its shape included) and the device fingerprint, and a table measured
for another space, shape or device is not resumed into. A table that is already complete is left
exactly as it is (nothing measured, nothing written). While a run writes a table it holds the lock
file OUT/<space>/<table>.lock: a second run on the same table stops at once naming the first one's
pid, or with --wait-lock waits for it to finish (and then finds the table complete). A killed run
leaves no lock behind that blocks.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "profile",
        help="measure every block of a search space on a device: the latency lookup table",
        description="Time every unique block of SPACE (stem and head included) on the backend of PROFILE, "
        "then time random whole subnets to calibrate the sum of blocks against end-to-end latency. "
        "Writes OUT/<space>/<device>__<profile>.csv (with __in<C>-cls<K> before .csv for a shape other than the "
        "preset's) with its .meta.json and .calibration.csv.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", required=True, help="device profile: a TOML file or the name of one in profiles/")
    parser.add_argument("--space", default=None,
                        help="search space name (see 'hwnas demo' or hwnas.spaces.names()); default with --like: "
                             "the checkpoint's")
    parser.add_argument("--in-channels", type=int, default=None, metavar="C",
                        help="input channels of the dataset (3 for RGB; default: the preset's)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="K",
                        help="classes of the dataset (default: the preset's)")
    parser.add_argument("--like", type=Path, default=None, metavar="SUPERNET.pt",
                        help="take the space and its shape from a supernet checkpoint (hwnas train's "
                             "OUT/supernet.pt), so that its search finds this table")
    parser.add_argument("--out", type=Path, default=Path("latency_tables"),
                        help="root of the tables (default: %(default)s)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start over instead of resuming an existing table")
    parser.add_argument("--wait-lock", action="store_true",
                        help="when another run is writing the same table, wait for it instead of stopping")
    parser.add_argument("--calibration-subnets", type=int, default=30, metavar="N",
                        help="random whole subnets measured to calibrate the table (default: %(default)s; 0: none)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds per block at least, more (up to 8) until the quickest two "
                             "agree; the quickest is kept (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subnets (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_busy_arguments(parser)
    parser.set_defaults(run=run)


def space_of(name: str | None, in_channels: int | None = None, num_classes: int | None = None,
             like: Path | None = None) -> SearchSpace:
    """The space to profile: preset `name` fitted to a dataset's shape, given outright or taken from the
    supernet checkpoint `like` (whose space the search will bring to the table, so the two must agree)."""
    from hwnas import spaces
    from hwnas.checkpoint import checkpoint_space, load_checkpoint
    from hwnas.errors import HwnasError
    from hwnas.latency.target import space_differences

    for option, value in (("--in-channels", in_channels), ("--num-classes", num_classes)):
        if value is not None and value < 1:
            raise HwnasError(f"{option} must be an integer >= 1, got {value}")
    shape = {"in_channels": in_channels, "num_classes": num_classes}
    trained = None
    if like is not None:
        trained = checkpoint_space(like, load_checkpoint(like))
        if name is not None and name != trained.name:
            raise HwnasError(f"--like {like}: the supernet's space is '{trained.name}', not --space '{name}'; "
                             "drop --space (it defaults to the supernet's)")
        name = trained.name
        for field, value in shape.items():
            if value is not None and value != getattr(trained, field):
                raise HwnasError(f"--{field.replace('_', '-')} {value} conflicts with --like {like} (its space has "
                                 f"{field} {getattr(trained, field)}); drop one of them")
            shape[field] = getattr(trained, field)
    if name is None:
        raise HwnasError("--space is required (or --like SUPERNET.pt to take it from a checkpoint)")
    overrides = {k: v for k, v in shape.items() if v is not None}
    space = spaces.get(name, **overrides)
    for field, value in overrides.items():
        if getattr(space, field) != value:
            raise HwnasError(f"space '{name}' ignores {field}: its factory built {field} {getattr(space, field)}, "
                             f"not {value}")
    if trained is not None:
        diffs = space_differences(trained.to_dict(), space.to_dict())
        if diffs:
            raise HwnasError(f"--like {like}: the supernet's space differs from the preset '{name}' beyond its shape "
                             f"({'; '.join(diffs[:3])}); a table of the preset would not fit it: profile the "
                             "checkpoint's own space from Python (hwnas.latency.profiler.profile_space)")
    return space


def run(args: argparse.Namespace) -> int:
    from hwnas.errors import HwnasError
    from hwnas.latency.profiler import profile_table
    from hwnas.latency.table import LatencyTable

    if args.calibration_subnets < 0 or args.rounds < 1:
        raise HwnasError("--calibration-subnets must be >= 0 and --rounds >= 1")
    space = space_of(args.space, args.in_channels, args.num_classes, args.like)
    done = profile_table(space, args.profile, args.out, resume=args.resume,
                         calibration_subnets=args.calibration_subnets, seed=args.seed, progress=not args.quiet,
                         rounds=args.rounds, guard=guard_from_args(args, "profile"), wait_lock=args.wait_lock)
    path = done.path
    table = LatencyTable.load(path)
    low, high = table.latency_range(space)
    cal = table.calibration
    if done.complete_before:
        print(f"{done.describe()} (--no-resume measures it again)")
    else:
        seconds = table.meta.get("profiling", {}).get("seconds", float("nan"))
        print(f"wrote {path} ({len(table)} blocks, {seconds:.1f} s of profiling in all)")
        print(f"  metadata:    {path.with_name(path.stem + '.meta.json')}")
        if cal.get("n_subnets"):
            resid = cal.get("residuals", {})
            print(f"  calibration: {path.with_name(path.stem + '.calibration.csv')} ({cal['kind']} on "
                  f"{cal['n_subnets']} subnets, in-sample MAPE {resid.get('mape_pct', float('nan')):.2f} %)")
    print(f"  predicted latency range of {space.name} ({space.in_channels}-channel input, {space.num_classes} "
          f"classes): {low:.3f} .. {high:.3f} ms")
    return 0
