"""`hwnas export`: cut searched subnets out of a supernet (no retraining), export, verify and measure them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwnas.export_pipeline import ExportRequest

EXAMPLE = """examples:
  hwnas export --arch results/run1/best.json --profile profiles/cpu-onnxruntime.toml --out exports/run1
      # from the supernet best.json records (relative to results/run1), fine-tuned weights if the search made them
  hwnas export --supernet runs/fmnist/supernet.pt --arch results/run1/best.json --out exports/run1
  hwnas export --arch results/family --out exports/family      # every arch of a multi-device search
  hwnas export --supernet S.pt --arch results/run1/best.json --precision int8 \\
      --profile cpu-onnxruntime-int8 --out exports/int8      # ONNX Runtime int8 (static QDQ) beside fp32
  hwnas export --supernet S.pt --arch results/run1/best.json --format tensorrt --precision int8 \\
      --profile profiles/cuda-tensorrt-fp16.toml --out exports/trt
  hwnas export --space mbv3-32 --arch '{"space": "mbv3-32", "resolution": 28, "depths": [2,2,2,2],
      "kernels": [3,3,3,3,3,3,3,3], "expands": [3,3,3,3,3,3,3,3]}' --out exports/check   # pipeline check

With a dataset (by default the one the checkpoint was trained on), BN is re-estimated on the
training batches the search used (settings read from best.json) and the accuracy is measured on
the validation split (beside the search's figure) and on the test split in torch and in ONNX
Runtime. With --profile, the exported artifact is timed on the profile's backend and shown beside
the table's prediction and the budget, with a warning when it is over budget. deploy.json in each
output folder holds every figure; the ONNX file carries them in its metadata, with the preprocessing
the accuracy was measured with (hwnas.preprocessing: colour mode, resize, scale, mean and std, as
JSON) and the class names in output order (hwnas.classes), so the file runs right without hwnas.
Files are named relative to the output folder, never by an absolute path.

--precision int8 (with --format onnx) also writes NAME.int8.onnx: the fp32 file statically quantized
by ONNX Runtime (QDQ, per-channel weights), calibrated on training images of the BN-re-estimated
subnet, checked by onnx.checker and run in ONNX Runtime. Its test accuracy is measured beside
fp32's, and both files are timed on the profile (an int8 one, such as cpu-onnxruntime-int8); the
calibration settings are in its metadata and deploy.json.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from hwnas.commands.train import val_size_arg  # the same N|F reading as hwnas train's

    parser = sub.add_parser(
        "export",
        help="cut searched subnets out of a supernet and export them to ONNX (verified) or TensorRT",
        description="Extract the subnet of ARCH from a trained supernet (or a fresh one, to check the pipeline), "
        "re-estimate BN, measure its accuracy, export it (ONNX checked by onnx.checker and compared with torch "
        "in ONNX Runtime; optionally a TensorRT engine) and time it on a device profile.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--arch", required=True,
        help="inline arch JSON, a JSON file (results/RUN/best.json), or a search folder (all its archs)")
    add("--supernet", type=Path,
        help="supernet checkpoint (default: the one the search used, as best.json records it; with --space and an "
             "inline arch, a freshly initialised supernet)")
    add("--space", help="search space name (needed without --supernet)")
    add("--format", choices=("onnx", "tensorrt"), default="onnx", help="onnx, or onnx plus a TensorRT engine")
    add("--precision", choices=("fp32", "fp16", "int8"), default=None,
        help="onnx: fp32 (default) or int8 (static QDQ, calibrated on training images); "
             "tensorrt: the engine's, fp16 (default), fp32 or int8 (calibrated)")
    add("--calibration", choices=("minmax", "entropy", "percentile"), default=None,
        help="int8 ONNX: the calibration method (default: the measured choice, see the README)")
    add("--calibration-images", type=int, default=None, metavar="N",
        help="int8 ONNX: training images to calibrate on (default: the measured choice)")
    add("--opset", type=int, default=17, help="ONNX opset (17: ONNX Runtime >= 1.11, TensorRT >= 8.6)")
    add("--no-simplify", dest="simplify", action="store_false",
        help="keep the graph as torch exported it (by default onnxslim simplifies it when parity holds)")
    add("--profile", help="device profile (a name in profiles/, or a TOML file) to time the exported artifact on")
    add("--table", type=Path, help="latency table for the prediction (default: the one the search used)")
    add("--budget-ms", type=float, help="latency budget to check against (default: the search's)")
    add("--data", help="dataset for BN re-estimation and accuracy (default: the checkpoint's); 'none' to skip")
    add("--test-batches", type=int, default=None, help="cap on test batches of 500 (default: the whole split)")
    add("--val-size", type=val_size_arg, default=None, metavar="N|F",
        help="training images held out as the validation split (a count, or a fraction below 1), as in hwnas "
             "train and search (default: what best.json records, else the checkpoint, else 5000)")
    add("--allow-mismatch", action="store_true", help="quietly use a table measured for another device")
    add("--out", type=Path, default=Path("exports"), help="output directory")
    parser.set_defaults(run=run)


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The library request that the arguments describe."""
    from hwnas.export_pipeline import ExportRequest

    return ExportRequest(arch=args.arch, supernet=args.supernet, space=args.space, format=args.format,
                         precision=args.precision, calibration=args.calibration,
                         calibration_images=args.calibration_images, opset=args.opset, simplify=args.simplify,
                         profile=args.profile,
                         table=args.table, budget_ms=args.budget_ms, data=args.data, test_batches=args.test_batches,
                         val_size=args.val_size, allow_mismatch=args.allow_mismatch, out=args.out)


def run(args: argparse.Namespace) -> int:
    from hwnas.deploy import summary_table
    from hwnas.export_pipeline import run_export

    reports = run_export(request_from_args(args), log=print,
                         warn=lambda message: print(f"hwnas export: warning: {message}", file=sys.stderr))
    if len(reports) > 1 or args.profile is not None:
        print(summary_table(reports))
    return 0
