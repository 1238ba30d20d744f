"""`hwnas import ofa`: a published Once-for-All supernet as an hwnas supernet checkpoint.

The module is `imports`, not `import`: `import` is a Python keyword, so `hwnas/cli.py` maps the
command's name to this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = """examples:
  hwnas import ofa --checkpoint ofa_mbv3_d234_e346_k357_w1.0 --out runs/ofa-w1.0/supernet.pt
  hwnas import ofa --checkpoint ofa_mbv3_d234_e346_k357_w1.2 --width 1.2 --out runs/ofa-w1.2/supernet.pt

The file is OFA's state dict, bare or in OFA's checkpoint dict ({"state_dict": ...}), read without
running pickled code. w1.0 becomes space mbv3-224, w1.2 space mbv3-224-w1.2, with OFA's kernel-transform
matrices and BN statistics. Any key missing, any extra key or a wrong shape is refused, naming the key,
and nothing is written. The checkpoint carries no dataset: search and export it with --data, e.g.
  hwnas search --supernet runs/ofa-w1.0/supernet.pt --data 'imagefolder:/data/imagenet?crop=0.875' \\
      --table latency_tables/mbv3-224/DEVICE__cpu-onnxruntime.csv --budget-ms 20 --out results/ofa-20ms
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "import",
        help="import a supernet trained elsewhere (Once-for-All's MobileNetV3) as an hwnas checkpoint",
        description="Import a supernet trained by another tool as an hwnas supernet checkpoint, to search and "
        "export it like one trained by 'hwnas train'.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    ofa = sources.add_parser(
        "ofa",
        help="Once-for-All's MobileNetV3 supernet (ofa_mbv3_d234_e346_k357_w1.0 or w1.2)",
        description="Map an OFA MobileNetV3 supernet state dict (d234_e346_k357, width 1.0 or 1.2) onto an hwnas "
        "supernet of the matching space, tensor for tensor, and write it as an hwnas checkpoint that records "
        "the file's name, size and sha256.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ofa.add_argument("--checkpoint", type=Path, required=True, help="OFA's supernet file (a torch state dict)")
    ofa.add_argument("--out", type=Path, required=True, help="the hwnas checkpoint to write (e.g. supernet.pt)")
    ofa.add_argument("--width", choices=("1.0", "1.2"), default=None,
                     help="OFA's width multiplier; checked against the tensors (default: read off them)")
    ofa.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ofa.set_defaults(run=run_ofa)


def run_ofa(args: argparse.Namespace) -> int:
    from hwnas.fileio import display_path
    from hwnas.ofa_import import import_ofa

    result = import_ofa(args.checkpoint, args.out, width=args.width, force=args.force,
                        warn=lambda message: print(f"hwnas import: warning: {message}", file=sys.stderr))
    source = result.source
    print(f"imported {display_path(args.checkpoint)} (OFA MobileNetV3 w{source['width']}, {source['settings']}, "
          f"{source['num_classes']} classes, sha256 {source['sha256'][:16]}...)")
    print(f"  wrote {display_path(result.out)}: space {result.space.name}, {result.tensors} tensors, kernel "
          "transforms and BN statistics included")
    print(f"  next: hwnas search --supernet {display_path(result.out)} --data 'imagefolder:DIR?crop=0.875' "
          f"--table latency_tables/{result.space.name}/DEVICE__PROFILE.csv --budget-ms MS")
    return 0
