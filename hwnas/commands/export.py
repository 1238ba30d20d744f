"""`hwnas export`: cut a subnet out of a supernet (no retraining) and export it."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLE = """examples:
  hwnas export --space mbv3-32 --arch '{"space": "mbv3-32", "resolution": 28, "depths": [2,2,2,2],
      "kernels": [3,3,3,3,3,3,3,3], "expands": [3,3,3,3,3,3,3,3]}' --out exports/check
  hwnas export --supernet runs/fmnist/supernet.pt --arch results/run1/best.json --out exports/run1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="cut a subnet out of a supernet and export it to ONNX (checked in ONNX Runtime) or TensorRT",
        description="Extract the subnet of ARCH from a trained supernet (or a fresh one, to check the pipeline) "
        "and export it: ONNX checked by onnx.checker and compared with torch in ONNX Runtime.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--arch", required=True, help="arch as inline JSON, or a JSON file (e.g. results/RUN/best.json)"
    )
    parser.add_argument("--supernet", type=Path, help="supernet checkpoint; without it a freshly initialised supernet")
    parser.add_argument("--space", help="search space name (needed without --supernet)")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    parser.add_argument("--precision", choices=("fp16", "int8"), default="fp16", help="TensorRT precision")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--out", type=Path, default=Path("exports"), help="output directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from exporters.onnx import export_onnx
    from hwnas import spaces
    from hwnas.errors import HwnasError
    from hwnas.space import Arch
    from hwnas.supernet import Supernet

    arch = Arch.parse(args.arch)
    if args.supernet is not None:
        from hwnas.checkpoint import load_supernet

        supernet, _ = load_supernet(args.supernet, space_name=arch.space)
        source = str(args.supernet)
    else:
        if args.space is None:
            raise HwnasError("give --supernet CKPT, or --space NAME to export from a freshly initialised supernet")
        supernet = Supernet(spaces.get(args.space))
        source = "fresh supernet (random weights)"
    space = supernet.space
    space.validate(arch)
    module = supernet.extract(arch).eval()

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / f"{space.name}_{arch.arch_id}.onnx"
    result = export_onnx(module, arch, onnx_path, input_shape=space.input_shape(arch), opset=args.opset,
                         metadata={"source": source})
    print(f"exported {arch.arch_id} from {source}")
    print(f"  onnx:    {result.path} (opset {result.opset}, checker passed, "
          f"ONNX Runtime vs torch max abs diff {result.max_abs_diff:.2e})")
    if args.format == "tensorrt":
        from exporters.tensorrt import build_engine

        engine_path = onnx_path.with_suffix(f".{args.precision}.engine")
        build = build_engine(onnx_path, engine_path, precision=args.precision)
        print(f"  engine:  {build.engine_path} ({build.precision}, TensorRT {build.tensorrt_version}, "
              f"built in {build.build_seconds:.1f} s; settings in {build.settings_path})")
    return 0
