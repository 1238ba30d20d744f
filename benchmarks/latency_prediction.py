"""How well do latency tables predict end-to-end latency, per backend, against a FLOPs proxy?

For each profile runnable here (CPU ones always, CUDA ones when torch sees a GPU) and each space
(mbv3-32, plus mbv3-224 on GPUs): profile the space into OUT/tables (or take --table), validate on
N random subnets, and report the share within +-5 % and +-10 %, MAPE, Kendall tau, beside the FLOPs
proxy's figures on the same subnets, and the profiling time. Everything lands under --out; a killed
run picks up where it stopped when started again with the same arguments (and the same --out).

--out gets summary.md, summary.csv, summary.json and artifacts.tar.gz (the tables, their metadata,
calibration and validation files, plots included), so that a machine that hands back only a few
flat files still returns all of it. Timings (blocks in 3 interleaved rounds): mbv3-32 takes about a
minute to profile and 2-4 minutes to validate on 200 subnets per GPU profile, mbv3-224 a few times
that; where one command may run 10 minutes, give one --profile (and one --space) per command.

    python benchmarks/latency_prediction.py --out bench/latency            # everything runnable here
    python benchmarks/latency_prediction.py --out bench/ort --profile profiles/cpu-onnxruntime.toml --n 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd

from hwnas import spaces
from hwnas.errors import HwnasError
from hwnas.fileio import atomic_write_text
from hwnas.latency.profiler import profile_space
from hwnas.latency.table import LatencyTable
from hwnas.latency.validate import validate_table

GPU_SPACES = ("mbv3-32", "mbv3-224")
CPU_SPACES = ("mbv3-32",)
PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


def _is_cuda(profile: Any) -> bool:
    return "cuda" in str(profile.backend) or "tensorrt" in str(profile.backend) or \
        str(getattr(profile, "device", "")).startswith("cuda")


def runnable_profiles(paths: list[str]) -> list[tuple[Any, str]]:
    """(profile, why-not) pairs: every given profile (default: profiles/*.toml) and whether it runs here."""
    import torch

    from hwnas.latency.backends import get_backend
    from hwnas.latency.profiles import load_profile

    chosen = paths or [str(p) for p in sorted(PROFILE_DIR.glob("*.toml"))]
    result = []
    for item in chosen:
        profile = load_profile(item)
        why = ""
        if _is_cuda(profile) and not torch.cuda.is_available():
            why = "no CUDA device"
        else:
            try:
                get_backend(profile)
            except (HwnasError, ImportError, RuntimeError) as exc:
                why = str(exc)
        result.append((profile, why))
    return result


def run_one(profile: Any, space_name: str, args: argparse.Namespace, table_path: Path | None) -> dict[str, Any]:
    space = spaces.get(space_name)
    started = time.perf_counter()
    if table_path is None:
        table_path = profile_space(space, profile, args.out / "tables", calibration_subnets=args.calibration_subnets,
                                   rounds=args.rounds, progress=not args.quiet)
    profile_wall = time.perf_counter() - started
    table = LatencyTable.load(table_path)
    out = args.out / "validation" / space_name / table_path.stem
    started = time.perf_counter()
    report = validate_table(table, n=args.n, seed=args.seed, out_dir=out, rounds=args.rounds, progress=not args.quiet,
                            allow_mismatch=args.allow_mismatch)
    validate_wall = time.perf_counter() - started
    print(report.summary(), flush=True)
    info = table.meta.get("profiling", {})
    cal = table.calibration
    return {
        "profile": table_path.stem.split("__", 1)[-1], "backend": report.backend, "space": space_name,
        "device": table.device_slug, "n": len(report.rows), "calibration": cal["kind"],
        "calibration_subnets": cal.get("n_subnets", 0),
        "lut_within_5pct": report.lut["within_5pct"], "lut_within_10pct": report.lut["within_10pct"],
        "lut_mape_pct": report.lut["mape_pct"], "lut_kendall_tau": report.lut["kendall_tau"],
        "lut_max_abs_pct": report.lut["max_abs_pct"],
        "flops_within_5pct": report.flops["within_5pct"], "flops_within_10pct": report.flops["within_10pct"],
        "flops_mape_pct": report.flops["mape_pct"], "flops_kendall_tau": report.flops["kendall_tau"],
        "raw_within_5pct": _raw_within(report.rows), "blocks": len(table),
        "profiling_s": float(info.get("seconds", profile_wall)), "validation_s": validate_wall,
        "table": str(table_path), "validation_dir": str(out),
    }


def _raw_within(rows: pd.DataFrame) -> float:
    """The uncalibrated block sum's share within +-5 %: what calibration buys."""
    err = (rows["predicted_raw"] - rows["measured"]).abs() / rows["measured"]
    return float((err <= 0.05).mean())


def write_artifacts(out: Path) -> Path:
    """Everything under out/tables and out/validation in one archive, written atomically."""
    target = out / "artifacts.tar.gz"
    fd, tmp = tempfile.mkstemp(prefix=".artifacts.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as archive:
            for name in ("tables", "validation"):
                if (out / name).exists():
                    archive.add(out / name, arcname=name)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def markdown(frame: pd.DataFrame) -> str:
    header = ("| backend | profile | space | ±5 % LUT | ±5 % FLOPs* | ±10 % LUT | ±10 % FLOPs* | MAPE LUT | "
              "MAPE FLOPs* | τ LUT | τ FLOPs* | ±5 % raw sum | calibration | profiling |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in frame.to_dict("records"):
        lines.append(
            f"| {r['backend']} | {r['profile']} | {r['space']} | {r['lut_within_5pct']:.1%} | "
            f"{r['flops_within_5pct']:.1%} | {r['lut_within_10pct']:.1%} | {r['flops_within_10pct']:.1%} | "
            f"{r['lut_mape_pct']:.2f} % | {r['flops_mape_pct']:.2f} % | {r['lut_kendall_tau']:.3f} | "
            f"{r['flops_kendall_tau']:.3f} | {r['raw_within_5pct']:.1%} | {r['calibration']} "
            f"({r['calibration_subnets']}) | {r['profiling_s']:.0f} s |")
    lines.append("")
    lines.append("\\* FLOPs proxy: the best line of measured latency on FLOPs, fitted on the validation subnets "
                 "themselves (in sample, which flatters it). The LUT is calibrated on other subnets.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="everything is written under this directory")
    parser.add_argument("--profile", action="append", default=[],
                        help="profile TOML or name (repeatable; default: every profiles/*.toml runnable here)")
    parser.add_argument("--space", action="append", default=[],
                        help=f"space (repeatable; default: {', '.join(CPU_SPACES)} on CPU, {', '.join(GPU_SPACES)} "
                        "on GPU)")
    parser.add_argument("--table", type=Path, help="validate this table instead of profiling (its own profile)")
    parser.add_argument("--n", type=int, default=200, help="validation subnets (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the validation subnets")
    parser.add_argument("--calibration-subnets", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--allow-mismatch", action="store_true", help="validate a --table measured elsewhere")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[Any, str, Path | None]] = []
    if args.table is not None:
        table = LatencyTable.load(args.table)
        jobs.append((table.profile, table.space_name, args.table))
    else:
        for profile, why in runnable_profiles(args.profile):
            if why:
                print(f"skipping profile {profile.name}: {why}", flush=True)
                continue
            for space_name in args.space or (GPU_SPACES if _is_cuda(profile) else CPU_SPACES):
                jobs.append((profile, space_name, None))

    results, failures = [], []
    for profile, space_name, table_path in jobs:
        print(f"\n== {profile.name} ({profile.backend}) on {space_name}", flush=True)
        try:
            results.append(run_one(profile, space_name, args, table_path))
        except Exception as exc:  # one backend failing must not lose the others' results
            traceback.print_exc()
            failures.append({"profile": profile.name, "space": space_name, "error": f"{type(exc).__name__}: {exc}"})
        frame = pd.DataFrame(results)
        if results:
            atomic_write_text(args.out / "summary.csv", frame.to_csv(index=False, float_format="%.6g"))
            atomic_write_text(args.out / "summary.md", markdown(frame))
        atomic_write_text(args.out / "summary.json", json.dumps({"results": results, "failures": failures},
                                                                indent=2) + "\n")
        write_artifacts(args.out)

    if results:
        print("\n" + markdown(pd.DataFrame(results)))
    print(f"wrote {args.out / 'summary.md'}, summary.csv, summary.json and artifacts.tar.gz (tables/ and "
          f"validation/) under {args.out}")
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
