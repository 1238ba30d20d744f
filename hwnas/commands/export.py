"""`hwnas export`: cut searched subnets out of a supernet (no retraining), export, verify and measure them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXAMPLE = """examples:
  hwnas export --supernet runs/fmnist/supernet.pt --arch results/run1/best.json \\
      --profile profiles/cpu-onnxruntime.toml --out exports/run1
  hwnas export --supernet S.pt --arch results/family --out exports/family      # every arch of a multi-device search
  hwnas export --supernet S.pt --arch results/run1/best.json --format tensorrt --precision int8 \\
      --profile profiles/cuda-tensorrt-fp16.toml --out exports/trt
  hwnas export --space mbv3-32 --arch '{"space": "mbv3-32", "resolution": 28, "depths": [2,2,2,2],
      "kernels": [3,3,3,3,3,3,3,3], "expands": [3,3,3,3,3,3,3,3]}' --out exports/check   # pipeline check

With a dataset (by default the one the checkpoint was trained on), BN is re-estimated on the
training batches the search used (settings read from best.json) and the accuracy is measured on
the validation split (beside the search's figure) and on the test split in torch and in ONNX
Runtime. With --profile, the exported artifact is timed on the profile's backend and shown beside
the table's prediction and the budget, with a warning when it is over budget. deploy.json in each
output folder holds every figure; the ONNX file carries them in its metadata.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add("--supernet", type=Path, help="supernet checkpoint; without it a freshly initialised supernet")
    add("--space", help="search space name (needed without --supernet)")
    add("--format", choices=("onnx", "tensorrt"), default="onnx", help="onnx, or onnx plus a TensorRT engine")
    add("--precision", choices=("fp16", "int8"), default="fp16", help="TensorRT precision (int8: calibrated)")
    add("--opset", type=int, default=17, help="ONNX opset (17: ONNX Runtime >= 1.11, TensorRT >= 8.6)")
    add("--no-simplify", dest="simplify", action="store_false",
        help="keep the graph as torch exported it (by default onnxslim simplifies it when parity holds)")
    add("--profile", help="device profile (a name in profiles/, or a TOML file) to time the exported artifact on")
    add("--table", type=Path, help="latency table for the prediction (default: the one the search used)")
    add("--budget-ms", type=float, help="latency budget to check against (default: the search's)")
    add("--data", help="dataset for BN re-estimation and accuracy (default: the checkpoint's); 'none' to skip")
    add("--test-batches", type=int, default=None, help="cap on test batches of 500 (default: the whole split)")
    add("--allow-mismatch", action="store_true", help="quietly use a table measured for another device")
    add("--out", type=Path, default=Path("exports"), help="output directory")
    parser.set_defaults(run=run)


def _jobs(arch_arg: str) -> list[dict[str, Any]]:
    """What to export: one arch (inline or a file) or every arch a search folder names (family.json)."""
    from hwnas.errors import ArchError
    from hwnas.space import Arch

    path = Path(arch_arg)
    if not arch_arg.lstrip().startswith("{") and path.is_dir():
        family = path / "family.json"
        if family.is_file():
            entries = json.loads(family.read_text())
            return [{"record": _read_record(path / e["dir"] / "best.json"), "name": e["dir"]} for e in entries
                    if e.get("best_arch_id")]
        if (path / "best.json").is_file():
            return [{"record": _read_record(path / "best.json"), "name": None}]
        raise ArchError(f"{path}: a search folder holds best.json or family.json; neither is there")
    arch = Arch.parse(arch_arg)
    record = _read_record(path) if path.suffix == ".json" and path.is_file() else {}
    record["arch"] = json.loads(arch.to_json())
    return [{"record": record, "name": None}]


def _read_record(path: Path) -> dict[str, Any]:
    from hwnas.errors import ArchError

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArchError(f"{path}: no such arch file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ArchError(f"{path}: not a JSON arch file ({exc})") from None
    if not isinstance(data, dict):
        raise ArchError(f"{path}: expected a JSON object")
    if "arch" not in data:
        data = {"arch": data}
    if data["arch"] is None:
        raise ArchError(f"{path}: the search found no arch within its budget (\"arch\": null)")
    return data


def run(args: argparse.Namespace) -> int:
    from hwnas import spaces
    from hwnas.deploy import EvalSettings, deploy
    from hwnas.errors import HwnasError
    from hwnas.space import Arch
    from hwnas.supernet import Supernet

    jobs = _jobs(args.arch)
    if not jobs:
        raise HwnasError(f"{args.arch}: no arch to export (every search in the folder came back empty)")
    first = Arch.from_dict(jobs[0]["record"]["arch"])
    state: dict[str, Any] = {}
    tuned = jobs[0]["record"].get("finetuned_supernet")
    if tuned and args.supernet is None:
        args.supernet = Path(tuned)  # the search changed the shared weights: the arch was chosen with these
    elif tuned and Path(tuned).resolve() != args.supernet.resolve():
        print(f"warning: {args.arch} was found with fine-tuned weights ({tuned}); exporting it with "
              f"{args.supernet} instead", file=sys.stderr)
    if args.supernet is not None:
        from hwnas.checkpoint import load_supernet

        supernet, state = load_supernet(args.supernet, space_name=first.space)
        source = str(args.supernet)
    else:
        if args.space is None:
            raise HwnasError("give --supernet CKPT, or --space NAME to export from a freshly initialised supernet")
        supernet = Supernet(spaces.get(args.space))
        source = "fresh supernet (random weights)"
    supernet.eval()
    space = supernet.space

    dataset = None
    data_spec = args.data or (str(state["dataset"]).split(" (", 1)[0] if state.get("dataset") else None)
    if data_spec and data_spec != "none":
        from hwnas.data import load_dataset

        val_size = int(jobs[0]["record"].get("val_size") or state.get("val_size") or 5000)
        dataset = load_dataset(data_spec, val_size=val_size, seed=0)
        if (dataset.in_channels, dataset.num_classes) != (space.in_channels, space.num_classes):
            raise HwnasError(f"dataset '{data_spec}' has {dataset.in_channels} channels and {dataset.num_classes} "
                             f"classes; the supernet expects {space.in_channels} and {space.num_classes}")

    profile = None
    if args.profile is not None:
        from hwnas.latency.profiles import load_profile

        profile = load_profile(args.profile)

    reports = []
    for job in jobs:
        record = job["record"]
        arch = Arch.from_dict(record["arch"])
        space.validate(arch)
        table = _table(args.table or record.get("table"), space, profile, args.allow_mismatch)
        table = _with_search_drift(table, record, explicit=args.table is not None)
        budget = args.budget_ms if args.budget_ms is not None else record.get("budget_ms")
        out = args.out / job["name"] if job["name"] else args.out
        print(f"exporting {arch.arch_id} from {source}" + (f" ({job['name']})" if job["name"] else ""))
        report = deploy(
            supernet, arch, out, dataset=dataset, settings=EvalSettings.from_record(record), profile=profile,
            table=table, budget_ms=float(budget) if budget is not None else None,
            search_accuracy=record.get("accuracy") if record.get("accuracy_metric", "accuracy") == "accuracy"
            else record.get("confirmed_accuracy", record.get("accuracy")),
            tensorrt=args.precision if args.format == "tensorrt" else None, opset=args.opset, simplify=args.simplify,
            test_batches=args.test_batches, metadata={"source": source})
        reports.append(report)
    if len(reports) > 1 or profile is not None:
        print(summary_table(reports))
    return 0


def _table(path: Any, space: Any, profile: Any, allow_mismatch: bool) -> Any:
    """The latency table for the prediction, or None; a table for another target is shown as a warning."""
    if not path:
        return None
    from hwnas.latency.table import LatencyTable

    table = LatencyTable.load(Path(path))
    fp = None
    if profile is not None:
        from hwnas.latency.device import fingerprint

        fp = fingerprint(profile)
    notes = table.check_target(space, profile, fp, allow_mismatch=True)
    if notes and not allow_mismatch:
        print(f"hwnas export: warning: {table.path}: the prediction is for another target than this one: "
              f"{'; '.join(notes)}", file=sys.stderr)
    return table


def _with_search_drift(table: Any, record: dict[str, Any], explicit: bool) -> Any:
    """The table as the search saw it: scaled by the drift it measured (`hwnas search --drift correct`)."""
    drift = record.get("latency_drift")
    if table is None or explicit or not isinstance(drift, dict) or "factor" not in drift:
        return table
    factor = float(drift["factor"])
    print(f"  prediction scaled by {factor:.3f}, the drift the search measured on this device "
          "(hwnas search --drift correct)")
    return table.with_drift(factor, drift)


def summary_table(reports: list[Any]) -> str:
    """One line per exported arch: budget, predicted, measured, accuracy, file."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    head = f"{'arch':<12} {'budget ms':>9} {'predicted':>9} {'measured':>9} {'meas/budget':>11} " \
           f"{'test acc torch':>14} {'test acc ORT':>12}  file"
    lines = [head, "-" * len(head)]
    for r in reports:
        ratio = r.measured_ms / r.budget_ms if r.measured_ms is not None and r.budget_ms else None
        lines.append(f"{r.arch_id:<12} {fmt(r.budget_ms, '9.4g')} {fmt(r.predicted_ms, '9.4g')} "
                     f"{fmt(r.measured_ms, '9.4g')} {fmt(ratio, '11.3f')} {fmt(r.test_accuracy_torch, '13.2f')}% "
                     f"{fmt(r.test_accuracy_ort, '11.2f')}%  {r.onnx_path}")
    return "\n".join(lines)
