"""Which latency model predicts whole subnets best: the plain block sum, the table's calibration, richer ones, FLOPs.

Reads a table, its calibration subnets and its validation report (`hwnas latency validate`), and
scores every model on the same held-out subnets, so no timing is repeated and the comparison is
exact. Two ways of fitting:

- on the table's own calibration subnets (30 by default), the way a shipped table is fitted:
  `sum` (no fit), `table` (the calibration the table chose by leave-one-out), `scale`,
  `linear+blocks`, `per-stage` (a scale per stage's inverted residuals, one for the fixed blocks,
  an intercept), `per-resolution` (a scale and intercept per input resolution);
- by 5-fold cross-validation on the validation subnets themselves (fit on four fifths, score on the
  rest): what a model could reach with more whole-subnet measurements, and the FLOPs line scored
  the same way (the report's FLOPs line is fitted in sample, which flatters it).

    python benchmarks/latency_models.py --table latency_tables/mbv3-224/DEVICE__cpu-onnxruntime.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.arch import Arch
from hwnas.latency.profiler import calibration_path
from hwnas.latency.table import LatencyTable
from hwnas.latency.validate import error_figures


def features(table: LatencyTable, arch: Arch) -> dict[str, Any]:
    """Per-stage inverted-residual time, fixed-block time, block count, resolution and FLOPs of one arch."""
    space = table.space
    specs = space.slot_specs(arch.resolution)
    per_stage = np.zeros(space.num_stages)
    for stage, index, kernel, expand in space.iter_stage_blocks(arch):
        per_stage[stage] += table.block_cost(specs.mbconv[(stage, index, kernel, expand)]) / table._scale["mbconv"]
    fixed = sum(table._values[s.key] for s in specs.fixed)
    return {"stages": per_stage, "fixed": fixed, "blocks": sum(arch.depths), "resolution": arch.resolution,
            "raw": float(per_stage.sum() + fixed), "flops": float(space.flops_params(arch)[0])}


def design(kind: str, f: list[dict[str, Any]], resolutions: list[int]) -> np.ndarray:
    one = np.ones(len(f))
    raw = np.array([x["raw"] for x in f])
    if kind == "scale":
        return raw[:, None]
    if kind == "linear+blocks":
        return np.column_stack([raw, [x["blocks"] for x in f], one])
    if kind == "per-stage":
        return np.column_stack([np.stack([x["stages"] for x in f]), [x["fixed"] for x in f], one])
    if kind == "per-resolution":
        cols = []
        for r in resolutions:
            at = np.array([x["resolution"] == r for x in f], dtype=float)
            cols += [raw * at, at]
        return np.column_stack(cols)
    if kind == "flops":
        return np.column_stack([[x["flops"] for x in f], one])
    raise ValueError(kind)


def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of the relative error (the figure of merit is the share within +-5 %), ridge-damped."""
    xs = x / y[:, None]
    a = xs.T @ xs + 1e-6 * np.eye(x.shape[1])
    return np.linalg.solve(a, xs.T @ np.ones(len(y)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--validation", type=Path, default=None, help="default: <table>.validation/validation.csv")
    parser.add_argument("--out", type=Path, default=None, help="default: beside the validation report")
    args = parser.parse_args()

    table = LatencyTable.load(args.table)
    space = table.space
    val_path = args.validation or args.table.with_name(args.table.stem + ".validation") / "validation.csv"
    val = pd.read_csv(val_path)
    cal = pd.read_csv(calibration_path(args.table))
    stat = f"{table.statistic}_ms"
    val_archs = [Arch.from_json(a) for a in val["arch"]]
    cal_archs = [Arch.from_json(a) for a in cal["arch"]]
    fv = [features(table, a) for a in val_archs]
    fc = [features(table, a) for a in cal_archs]
    y, yc = val["measured"].to_numpy(), cal[stat].to_numpy()
    res = list(space.resolution_choices)
    rows = [{"model": "sum of blocks (no fit)", "fit": "-", **error_figures(np.array([x["raw"] for x in fv]), y)},
            {"model": f"the table's calibration ({table.calibration['kind']})", "fit": f"{len(yc)} calibration subnets",
             **error_figures(table.predict_many(val_archs), y)}]
    for kind in ("scale", "linear+blocks", "per-stage", "per-resolution"):
        w = fit(design(kind, fc, res), yc)
        rows.append({"model": kind, "fit": f"{len(yc)} calibration subnets",
                     **error_figures(design(kind, fv, res) @ w, y)})
    folds = np.arange(len(y)) % 5
    for kind in ("scale", "linear+blocks", "per-stage", "per-resolution", "flops"):
        pred = np.zeros(len(y))
        x = design(kind, fv, res)
        for k in range(5):
            train, test = folds != k, folds == k
            pred[test] = x[test] @ fit(x[train], y[train])
        rows.append({"model": kind if kind != "flops" else "FLOPs line", "fit": "5-fold on the validation subnets",
                     **error_figures(pred, y)})
    frame = pd.DataFrame(rows)
    out = args.out or val_path.parent
    meta = {"table": str(args.table), "validation": str(val_path), "subnets": len(y), "calibration_subnets": len(yc),
            "quiet_during_validation": json.loads((val_path.parent / "validation.json").read_text()).get("quiet")}
    text = [f"# Latency models on {space.name}, {table.device_slug} ({(table.profile_dict or {}).get('name')})", "",
            f"- {len(y)} validation subnets measured by `hwnas latency validate` ({val_path.name}); the table's "
            f"{len(yc)} calibration subnets; no timing repeated here", "",
            "| model | fitted on | within 5 % | within 10 % | MAPE | Kendall tau |", "|---|---|---|---|---|---|"]
    for r in rows:
        text.append(f"| {r['model']} | {r['fit']} | {100 * r['within_5pct']:.1f} % | {100 * r['within_10pct']:.1f} % | "
                    f"{r['mape_pct']:.2f} % | {r['kendall_tau']:.3f} |")
    (out / "models.md").write_text("\n".join(text) + "\n")
    (out / "models.json").write_text(json.dumps({"meta": meta, "rows": frame.to_dict("records")}, indent=2) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
