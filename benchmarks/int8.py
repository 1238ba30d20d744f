"""int8 against fp32 on a CPU: what static quantization costs in accuracy and buys in latency.

Two parts, each on archs of the shipped supernet (hwnas/checkpoints/mbv3-32_fashion-mnist.pt),
BN re-estimated as the export does (8 x 256 training images, seed 0) before the fp32 ONNX export:

- `calibration`: how to calibrate. First every data type (S8S8, U8S8, U8U8, with or without
  reduce_range) with every calibration method (MinMax, Entropy, Percentile at a few clipping
  points) on one image count, then the best of them on other image counts, on a few archs; int8
  accuracy on the validation split beside fp32's (the choice is made on validation, as the search
  ranks on it), then the test split once for the choice. Accuracy, not timing: it may run on a
  busy machine, but the data type's effect depends on the CPU (saturation of AVX2's u8 x s8
  products, which VNNI does not have), so it is the CPU's, named in the results. This is what
  chose `exporters.onnx_int8.DEFAULT_SETTINGS`.

      python benchmarks/int8.py calibration --out benchmarks/results/int8

- `tradeoff`: the default settings on 10 archs (smallest, largest, 8 random): int8 and fp32 test
  accuracy in ONNX Runtime, and latency on the `cpu-onnxruntime-int8` profile's settings (1 thread,
  batch 1), the two files timed in interleaved rounds, the quickest round of each kept; the
  speed-up is fp32's over int8's. Timing: run it on a quiet machine (the quiet guard's reading is
  in the results).

      python benchmarks/int8.py tradeoff --out benchmarks/results/int8
      python benchmarks/int8.py tradeoff --archs 2 --test-batches 1 --rounds 2 --out /tmp/int8   # a check

Each part writes PART.json and PART.md to --out, with the device, commit, date and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from exporters.onnx import export_onnx
from exporters.onnx_int8 import DEFAULT_SETTINGS, Int8Settings, quantize_onnx
from hwnas.arch import Arch
from hwnas.checkpoint import load_supernet
from hwnas.data import Dataset, load_dataset
from hwnas.demo import shipped_supernet
from hwnas.deploy import int8_calibration, ort_accuracy
from hwnas.evaluation import DEFAULT_SETTINGS as EVAL_SETTINGS
from hwnas.evaluation import recalibrated_subnet
from hwnas.fileio import recorded_path
from hwnas.supernet import Supernet

METHODS = "minmax,entropy,percentile:99.999,percentile:99.99,percentile:99.9"
# every field spelled out: the defaults are themselves a choice these rows make
TYPES = {t: {"activation_type": a, "weight_type": w, "reduce_range": rr} for t, a, w, rr in (
    ("S8S8", "int8", "int8", False), ("S8S8+rr", "int8", "int8", True), ("U8S8", "uint8", "int8", False),
    ("U8S8+rr", "uint8", "int8", True), ("U8U8", "uint8", "uint8", False))}


def parse_method(text: str) -> dict[str, Any]:
    """'percentile:99.9' -> {'method': 'percentile', 'percentile': 99.9}; 'minmax' -> {'method': 'minmax'}."""
    name, _, value = text.partition(":")
    return {"method": name, **({"percentile": float(value)} if value else {})}


def method_label(settings: Int8Settings) -> str:
    return f"percentile {settings.percentile:g}" if settings.method == "percentile" else settings.method


def type_label(settings: Int8Settings) -> str:
    """S8S8, U8S8+rr, ...: activations then weights, signed or unsigned; +rr for reduce_range."""
    kinds = "".join("S8" if t == "int8" else "U8" for t in (settings.activation_type, settings.weight_type))
    return kinds + ("+rr" if settings.reduce_range else "")


def label(settings: Int8Settings) -> str:
    return f"{type_label(settings)}, {method_label(settings)}, {settings.calibration_images}"


def pick_archs(supernet: Supernet, n: int, seed: int) -> list[Arch]:
    """The smallest, the largest, then distinct random archs, `n` in all."""
    space = supernet.space
    rng = np.random.default_rng(seed)
    archs = [space.smallest(), space.largest()][:n]
    while len(archs) < n:
        arch = space.sample(rng)
        if arch not in archs:
            archs.append(arch)
    return archs


def export_fp32(supernet: Supernet, arch: Arch, dataset: Dataset, folder: Path) -> Path:
    """The arch cut out, BN re-estimated as `hwnas export` does, exported and checked."""
    module = recalibrated_subnet(supernet, arch, dataset.train, EVAL_SETTINGS)
    return export_onnx(module, arch, folder / f"{arch.arch_id}.onnx", input_shape=supernet.space.input_shape(arch)).path


def quantize(path: Path, arch: Arch, dataset: Dataset, settings: Int8Settings) -> tuple[Path, float]:
    """The fp32 file quantized with `settings` on training images; the int8 path and the seconds it took."""
    images = int8_calibration(dataset.train, arch.resolution, settings, seed=EVAL_SETTINGS.seed)
    result = quantize_onnx(path, path.with_suffix(".int8.onnx"), images, settings)
    return result.path, result.seconds


def header() -> dict[str, Any]:
    """What a result needs to be read later: device, commit, date, load."""
    from hwnas.latency.device import describe, fingerprint
    from hwnas.latency.profiles import load_profile
    from hwnas.provenance import git_commit

    return {"device": describe(fingerprint(load_profile("cpu-onnxruntime-int8"))), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "loadavg_before": _loadavg()}


def _loadavg() -> list[str]:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else []


def _write(out: Path | None, name: str, data: dict[str, Any], lines: list[str]) -> None:
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")


# ---- calibration ---------------------------------------------------------------------------------------------
def calibration(args: argparse.Namespace, supernet: Supernet, dataset: Dataset, work: Path) -> None:
    head = header()
    archs = pick_archs(supernet, args.archs, args.seed)
    first = [replace(DEFAULT_SETTINGS, calibration_images=args.images[0], **TYPES[t], **parse_method(m)).check()
             for t in args.types.split(",") for m in args.methods.split(",")]
    val = {"max_batches": args.val_batches}
    rows: list[dict[str, Any]] = []
    fp32: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}

    def measure(arch: Arch, settings: Int8Settings) -> dict[str, Any]:
        int8_path, seconds = quantize(paths[arch.arch_id], arch, dataset, settings)
        row = {"arch_id": arch.arch_id, "config": label(settings), "types": type_label(settings),
               "method": method_label(settings),
               "images": settings.calibration_images, "activation_type": settings.activation_type,
               "weight_type": settings.weight_type, "reduce_range": settings.reduce_range,
               "val_int8": ort_accuracy(int8_path, dataset.val, arch.resolution, threads=args.threads, **val),
               "quantize_s": seconds}
        row["val_drop"] = fp32[arch.arch_id]["val_fp32"] - row["val_int8"]
        print(f"  {arch.arch_id} {row['config']}: val {row['val_int8']:.2f} % ({-row['val_drop']:+.2f}), "
              f"quantized in {seconds:.1f} s", flush=True)
        return row

    for arch in archs:
        paths[arch.arch_id] = export_fp32(supernet, arch, dataset, work)
        fp32[arch.arch_id] = {"arch": json.loads(arch.to_json()), "val_fp32": ort_accuracy(
            paths[arch.arch_id], dataset.val, arch.resolution, threads=args.threads, **val)}
        print(f"{arch.arch_id}: fp32 val {fp32[arch.arch_id]['val_fp32']:.2f} %", flush=True)
        rows += [measure(arch, c) for c in first]

    def mean_drop(settings: Int8Settings) -> float:
        return statistics.mean(r["val_drop"] for r in rows if r["config"] == label(settings))

    best_first = min(first, key=mean_drop)  # then the image count, for the best type and method
    counts = [replace(best_first, calibration_images=n) for n in args.images[1:]]
    rows += [measure(arch, c) for arch in archs for c in counts]
    chosen = min([best_first, *counts], key=mean_drop)
    best = label(chosen)
    for arch in archs:  # the test split, once, for the chosen settings
        int8_path, _ = quantize(paths[arch.arch_id], arch, dataset, chosen)
        test = {"threads": args.threads, "max_batches": args.test_batches}
        fp32[arch.arch_id]["test_fp32"] = ort_accuracy(paths[arch.arch_id], dataset.test, arch.resolution, **test)
        fp32[arch.arch_id]["test_int8"] = ort_accuracy(int8_path, dataset.test, arch.resolution, **test)

    n_val = min(len(dataset.val), 500 * args.val_batches) if args.val_batches else len(dataset.val)
    lines = [f"# int8 calibration on the shipped supernet ({len(archs)} archs, validation split)", "",
             f"- machine: {head['device']}; load before {head['loadavg_before']}",
             f"- commit {head['commit']}, {head['date']}; ONNX Runtime static QDQ, per-channel weights; "
             f"int8 accuracy in ONNX Runtime on {n_val} validation images; BN re-estimated on "
             f"{EVAL_SETTINGS.bn_batches}x{EVAL_SETTINGS.bn_batch_size} training images, calibration images "
             "from the training split (seeded, not augmented)", "",
             "| arch | fp32 val % |", "|---|---|"]
    lines += [f"| {a} | {f['val_fp32']:.2f} |" for a, f in fp32.items()]
    lines += ["", "Types: activations then weights, S8 int8, U8 uint8, +rr reduce_range (7-bit weights). Mean drop "
              "over the archs: fp32 - int8, points, on validation.", "",
              "| types, calibration, images | " + " | ".join(f"{a} int8 val %" for a in fp32) + " | mean drop | "
              "quantize s (mean) |", "|---" * (len(fp32) + 3) + "|"]
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        lines.append(f"| {config}{' (chosen)' if config == best else ''} | "
                     + " | ".join(f"{r['val_int8']:.2f}" for r in mine)
                     + f" | {statistics.mean(r['val_drop'] for r in mine):.2f} | "
                     f"{statistics.mean(r['quantize_s'] for r in mine):.1f} |")
    lines += ["", f"Chosen: {best} (the least mean drop on validation; image counts tried for the best type and "
              f"method of the first {len(first)} rows). Test split, once, with it:", "",
              "| arch | fp32 test % | int8 test % | drop |", "|---|---|---|---|"]
    lines += [f"| {a} | {f['test_fp32']:.2f} | {f['test_int8']:.2f} | {f['test_fp32'] - f['test_int8']:.2f} |"
              for a, f in fp32.items()]
    head["loadavg_after"] = _loadavg()
    _write(args.out, "calibration", {**head, "args": _args(args), "chosen": chosen.to_dict(), "archs": fp32,
                                     "rows": rows}, lines)


# ---- trade-off -----------------------------------------------------------------------------------------------
def tradeoff(args: argparse.Namespace, supernet: Supernet, dataset: Dataset, work: Path) -> None:
    from hwnas.latency.backends import OnnxRuntimeCpuBackend, Timing
    from hwnas.latency.profiles import load_profile
    from hwnas.latency.quiet import QuietGuard

    profile = load_profile(args.profile)
    if profile.backend != "onnxruntime-cpu":
        raise SystemExit(f"int8: --profile must be an onnxruntime-cpu profile, not {profile.backend}")
    settings = DEFAULT_SETTINGS.with_calibration(args.method, args.calibration_images)
    head = header()
    archs = pick_archs(supernet, args.archs, args.seed)
    rows: list[dict[str, Any]] = []
    files: list[tuple[Path, Path, tuple[int, int, int]]] = []
    for arch in archs:
        fp32_path = export_fp32(supernet, arch, dataset, work)
        int8_path, seconds = quantize(fp32_path, arch, dataset, settings)
        test = {"max_batches": args.test_batches}
        row = {"arch_id": arch.arch_id, "arch": json.loads(arch.to_json()),
               "mflops": supernet.space.flops_params(arch)[0] / 1e6, "quantize_s": seconds,
               "test_fp32": ort_accuracy(fp32_path, dataset.test, arch.resolution, **test),
               "test_int8": ort_accuracy(int8_path, dataset.test, arch.resolution, **test)}
        print(f"{arch.arch_id}: test fp32 {row['test_fp32']:.2f} %, int8 {row['test_int8']:.2f} %", flush=True)
        rows.append(row)
        files.append((fp32_path, int8_path, supernet.space.input_shape(arch)))

    backend = OnnxRuntimeCpuBackend(profile)
    guard = QuietGuard(policy="warn", max_wait_s=args.max_wait, log=print)
    rounds: list[dict[str, list[Timing]]] = [{"fp32": [], "int8": []} for _ in rows]
    busy: list[float] = []
    for r in range(args.rounds):  # every file once a round, fp32 and int8 in turn (which goes first alternates)
        guard.wait(f"timing round {r + 1}")
        with guard.measuring(f"round {r + 1}") as reading:
            for i, (fp32_path, int8_path, shape) in enumerate(files):
                order = [("fp32", fp32_path), ("int8", int8_path)]
                for kind, path in order[::-1] if (r + i) % 2 else order:
                    rounds[i][kind].append(backend.time_onnx(path, shape))
        busy += [b.others for b in reading]
    for row, timed in zip(rows, rounds, strict=True):
        for kind in ("fp32", "int8"):
            values = [t.value(profile.statistic) for t in timed[kind]]
            row[f"{kind}_ms"], row[f"{kind}_rounds_ms"] = min(values), values
        row["speedup"] = row["fp32_ms"] / row["int8_ms"]
        row["drop"] = row["test_fp32"] - row["test_int8"]

    head["loadavg_after"] = _loadavg()
    head["others_busy_median"] = statistics.median(busy) if busy else None
    n_test = min(len(dataset.test), 500 * args.test_batches) if args.test_batches else len(dataset.test)
    lines = [f"# int8 vs fp32 on {profile.name}'s settings ({len(rows)} archs of the shipped supernet)", "",
             f"- machine: {head['device']}; load before {head['loadavg_before']}, after {head['loadavg_after']}; "
             f"the other CPUs' busy share while timing (median of rounds): "
             + ("n/a" if head["others_busy_median"] is None else f"{100 * head['others_busy_median']:.0f} %"),
             f"- commit {head['commit']}, {head['date']}",
             f"- int8: {settings.describe()} of the training split; accuracy in ONNX Runtime on {n_test} test "
             f"images; latency: {profile.description} ({profile.statistic} of a round of up to {profile.repeats} "
             f"calls), {args.rounds} interleaved rounds, the quickest of each file kept", "",
             "| arch | MFLOPs | fp32 test % | int8 test % | drop | fp32 ms | int8 ms | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arch_id']} | {r['mflops']:.1f} | {r['test_fp32']:.2f} | {r['test_int8']:.2f} | {r['drop']:.2f} | "
              f"{r['fp32_ms']:.4g} | {r['int8_ms']:.4g} | {r['speedup']:.2f}x |" for r in rows]
    drops, speedups = [r["drop"] for r in rows], [r["speedup"] for r in rows]
    lines += ["", f"Mean drop {statistics.mean(drops):.2f} points (worst {max(drops):.2f}); speed-up median "
              f"{statistics.median(speedups):.2f}x (range {min(speedups):.2f}-{max(speedups):.2f}x)."]
    for warning in guard.warnings:
        lines.append(f"- warning: {warning}")
    _write(args.out, "tradeoff", {**head, "args": _args(args), "settings": settings.to_dict(),
                                  "profile": profile.to_record(), "rows": rows}, lines)


def _args(args: argparse.Namespace) -> dict[str, Any]:
    # paths relative to the summary's own folder (where it is written), never this machine's layout
    return {k: (recorded_path(v, args.out) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("run", "out")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    cal = sub.add_parser("calibration", help="choose the calibration method and image count (accuracy only)")
    cal.add_argument("--archs", type=int, default=3, help="smallest, largest, then random (default: %(default)s)")
    cal.add_argument("--methods", default=METHODS, help="comma-separated (default: %(default)s)")
    cal.add_argument("--types", default=",".join(TYPES), help="comma-separated (default: %(default)s)")
    cal.add_argument("--images", default="256,64,1024",
                     help="calibration image counts, the first for every type and method (default: %(default)s)")
    cal.add_argument("--val-batches", type=int, default=None, help="cap on validation batches of 500 (default: all)")
    cal.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for accuracy (default: 1)")
    cal.set_defaults(run=calibration)
    trade = sub.add_parser("tradeoff", help="int8 vs fp32 accuracy and latency on 10 archs")
    trade.add_argument("--archs", type=int, default=10, help="smallest, largest, then random (default: %(default)s)")
    trade.add_argument("--profile", default="cpu-onnxruntime-int8", help="timing settings (default: %(default)s)")
    trade.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (default: %(default)s)")
    trade.add_argument("--method", default=None, help="calibration method (default: the exporter's)")
    trade.add_argument("--calibration-images", type=int, default=None, help="(default: the exporter's)")
    trade.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per round")
    trade.set_defaults(run=tradeoff)
    for part in (cal, trade):
        part.add_argument("--seed", type=int, default=0, help="which random archs (default: %(default)s)")
        part.add_argument("--test-batches", type=int, default=None, help="cap on test batches of 500 (default: all)")
        part.add_argument("--out", type=Path, help="write PART.json and PART.md here")
    args = parser.parse_args(argv)
    if args.part == "calibration":
        args.images = [int(n) for n in args.images.split(",")]
    if args.archs < 1 or (args.part == "tradeoff" and args.rounds < 1):
        parser.error("--archs and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hwnas.errors import HwnasError

    run: Callable[[argparse.Namespace, Supernet, Dataset, Path], None] = args.run
    try:
        supernet, _ = load_supernet(shipped_supernet(), space_name="mbv3-32")
        dataset = load_dataset("fashion-mnist", val_size=5000, seed=0)
        with tempfile.TemporaryDirectory(prefix="hwnas-int8-") as work:
            run(args, supernet.eval(), dataset, Path(work))
    except HwnasError as exc:
        print(f"int8: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
