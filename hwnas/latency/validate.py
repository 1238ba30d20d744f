"""Validation of a latency table: measure random subnets end to end and compare with prediction.

The subnets are drawn with another seed than the calibration ones (and any calibration subnet is
skipped), so the figures are out of sample. FLOPs are reported beside them as the proxy a table has
to beat; the FLOPs line is fitted on the very subnets it is scored on, which flatters it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.errors import LatencyTableError
from hwnas.fileio import atomic_write_text, check_output_dir, recorded_path
from hwnas.latency.profiler import calibration_archs, measure_subnets
from hwnas.latency.quiet import QuietGuard
from hwnas.latency.table import LatencyTable
from hwnas.space import Arch, SearchSpace

PARTIAL = "validation.partial.csv"


def error_figures(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """MAPE, shares within +-5 % and +-10 %, Kendall tau, worst and typical errors (in %)."""
    from scipy.stats import kendalltau

    predicted = np.asarray(predicted, dtype=float)
    measured = np.asarray(measured, dtype=float)
    rel = (predicted - measured) / measured
    err = np.abs(rel)
    tau = float(kendalltau(predicted, measured).statistic) if len(measured) > 1 else float("nan")
    return {
        "n": int(len(measured)),
        "mape_pct": float(100 * err.mean()),
        "within_5pct": float((err <= 0.05).mean()),
        "within_10pct": float((err <= 0.10).mean()),
        "kendall_tau": tau,
        "max_abs_pct": float(100 * err.max()),
        "median_abs_pct": float(100 * np.median(err)),
        "p90_abs_pct": float(100 * np.percentile(err, 90)),
        "bias_pct": float(100 * rel.mean()),
    }


def flops_proxy(flops: np.ndarray, measured: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Best line measured ~ a * flops + b (least relative squares), fitted in sample, and its predictions."""
    flops = np.asarray(flops, dtype=float)
    measured = np.asarray(measured, dtype=float)
    x = np.column_stack([flops, np.ones_like(flops)]) / measured[:, None]
    (a, b), *_ = np.linalg.lstsq(x, np.ones_like(measured), rcond=None)
    return a * flops + b, {"ms_per_mflop": float(a * 1e6), "intercept_ms": float(b)}


@dataclass
class ValidationReport:
    """What `validate_table` found, and where it wrote it."""

    table: str
    space: str
    backend: str
    device_slug: str
    statistic: str
    rows: pd.DataFrame
    lut: dict[str, float]
    flops: dict[str, float]
    flops_fit: dict[str, float]
    calibration: str
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    quiet: dict[str, Any] | None = None  # the quiet guard's summary of the machine while it measured

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "space": self.space, "backend": self.backend, "device_slug": self.device_slug,
                "statistic": self.statistic, "n": len(self.rows), "calibration": self.calibration,
                "lut": self.lut, "flops_proxy": self.flops,
                "flops_proxy_fit": {**self.flops_fit, "note": "fitted in sample on these subnets (flatters FLOPs)"},
                "quiet": self.quiet, "warnings": self.warnings, "files": self.files}

    def summary(self) -> str:
        """The figures as a small aligned table, LUT beside the FLOPs proxy."""
        lines = [f"{self.space} on {self.device_slug} ({self.backend}, {self.statistic}), {len(self.rows)} random "
                 f"subnets, calibration {self.calibration}",
                 f"{'':24}{'LUT':>10}{'FLOPs*':>10}"]
        for name, label, fmt in (("within_5pct", "within +-5 %", "{:.1%}"), ("within_10pct", "within +-10 %", "{:.1%}"),
                                 ("mape_pct", "MAPE", "{:.2f} %"), ("kendall_tau", "Kendall tau", "{:.3f}"),
                                 ("max_abs_pct", "max error", "{:.1f} %")):
            lines.append(f"  {label:22}{fmt.format(self.lut[name]):>10}{fmt.format(self.flops[name]):>10}")
        lines.append("  * FLOPs: best line fitted on these same subnets (in sample, which flatters it)")
        return "\n".join(lines)


def validate_table(table: LatencyTable | str | Path, space: SearchSpace | None = None, *, n: int = 200, seed: int = 1,
                   backend: Any = None, out_dir: str | Path | None = None, allow_mismatch: bool = False,
                   rounds: int = 3, resume: bool = True, progress: bool = False,
                   measure: bool = True, guard: QuietGuard | None = None) -> ValidationReport:
    """Measure `n` random subnets on the table's backend and score the table's predictions against them.

    Refuses to measure on a device whose identity differs from the table's (the comparison would say
    nothing about the table) unless `allow_mismatch`. With `out_dir`, finished measurements are kept
    in `validation.partial.csv`, so a killed run resumes where it stopped. `measure=False` scores
    only what an interrupted run left in `out_dir` (same table, seed and statistic) without a
    backend, on any machine: a validation cut short on a device that is no longer at hand still
    reports on the subnets it measured, and says how many of the `n` those were.
    """
    from hwnas.flops import arch_flops

    out = check_output_dir(out_dir) if out_dir is not None else None  # before any work
    if not isinstance(table, LatencyTable):
        table = LatencyTable.load(table)
    space = space if space is not None else table.space
    profile = table.profile
    if profile is None:
        raise LatencyTableError(f"{table.path}: the table names no profile, so there is no backend to measure on")
    warnings: list[str] = []
    if not measure:
        warnings = table.check_target(space, allow_mismatch=allow_mismatch)
    elif backend is None:
        from hwnas.latency.backends import get_backend
        from hwnas.latency.device import fingerprint

        warnings = table.check_target(space, profile, fingerprint(profile), allow_mismatch=allow_mismatch)
        backend = get_backend(profile)
    else:
        warnings = table.check_target(space, allow_mismatch=allow_mismatch)
    missing = table.missing_keys(space)
    if missing:
        raise LatencyTableError(f"{table.path}: no entry for block '{missing[0]}' "
                                f"({len(missing)} missing; resume the profile first)")

    exclude = set(table.calibration.get("arch_ids", []))
    archs = calibration_archs(space, n, seed, exclude=exclude)
    statistic = table.statistic
    done = _read_partial(out, table, seed, statistic) if (out is not None and resume) else {}
    todo = [a for a in archs if a.arch_id not in done]
    if not measure:
        if len(archs) - len(todo) < 2:
            raise LatencyTableError(f"{out}: no measurements of an earlier validation of {table.path} (seed {seed}, "
                                    f"{statistic}) to score; run the validation on the table's device first")
        warnings.append(f"scored {len(archs) - len(todo)} of {n} subnets: the measuring run stopped before the rest")
        archs, todo = [a for a in archs if a.arch_id in done], []

    def keep(chunk: list[tuple[Arch, Any]]) -> None:
        for arch, timing in chunk:
            done[arch.arch_id] = {"arch": arch.to_json(), "arch_id": arch.arch_id,
                                  "measured": float(timing.value(statistic)), "p10": float(timing.p10_ms),
                                  "p90": float(timing.p90_ms), "n": int(timing.n), "rounds": int(timing.rounds),
                                  "others_busy": float(timing.others_busy)}
        if out is not None:
            _write_partial(out, table, seed, statistic, done)

    measure_subnets(space, todo, backend, rounds=rounds, statistic=statistic, on_chunk=keep, progress=progress,
                    desc="validation", guard=guard)

    measured = np.array([done[a.arch_id]["measured"] for a in archs])
    predicted = table.predict_many(archs)
    flops = np.array([arch_flops(space, a) for a in archs], dtype=float)
    flops_pred, flops_fit = flops_proxy(flops, measured)
    rows = pd.DataFrame({
        "arch": [a.to_json() for a in archs], "arch_id": [a.arch_id for a in archs],
        "flops": flops.astype(np.int64), "predicted": predicted, "predicted_raw": [table.predict_raw(a) for a in archs],
        "flops_proxy": flops_pred, "measured": measured,
        "p10": [done[a.arch_id]["p10"] for a in archs], "p90": [done[a.arch_id]["p90"] for a in archs],
        "rounds": [done[a.arch_id].get("rounds", math.nan) for a in archs],
        "others_busy": [done[a.arch_id].get("others_busy", math.nan) for a in archs],
    })
    report = ValidationReport(
        table=str(table.path), space=space.name, backend=str(getattr(profile, "backend", "?")),
        device_slug=table.device_slug, statistic=statistic, rows=rows, lut=error_figures(predicted, measured),
        flops=error_figures(flops_pred, measured), flops_fit=flops_fit, calibration=str(table.calibration["kind"]),
        warnings=warnings + (guard.warnings if guard is not None else []),
        quiet=guard.summary() if guard is not None else None)
    if out is not None:
        _write_outputs(report, out)
    if out is not None and measure:
        (out / PARTIAL).unlink(missing_ok=True)
        (out / (PARTIAL + ".json")).unlink(missing_ok=True)
    return report


def _partial_identity(table: LatencyTable, seed: int, statistic: str) -> dict[str, Any]:
    return {"table": str(table.path), "date": table.meta.get("date"), "seed": seed, "statistic": statistic}


def _read_partial(out: Path, table: LatencyTable, seed: int, statistic: str) -> dict[str, dict[str, Any]]:
    """Measurements of an interrupted run of the same validation (same table, seed and statistic)."""
    path, ident = out / PARTIAL, out / (PARTIAL + ".json")
    try:
        if json.loads(ident.read_text()) != _partial_identity(table, seed, statistic):
            return {}
        rows = pd.read_csv(path, dtype={"arch_id": str, "arch": str})
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return {}
    return {r["arch_id"]: r for r in rows.to_dict("records")}


def _write_partial(out: Path, table: LatencyTable, seed: int, statistic: str, done: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(out / (PARTIAL + ".json"), json.dumps(_partial_identity(table, seed, statistic)))
    atomic_write_text(out / PARTIAL, pd.DataFrame(list(done.values())).to_csv(index=False, float_format="%.6g"))


def _write_outputs(report: ValidationReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "validation.csv", "png": out / "validation.png", "json": out / "validation.json"}
    report.files = {k: v.name for k, v in files.items()}  # beside validation.json: names, not this machine's paths
    atomic_write_text(files["csv"], report.rows.to_csv(index=False, float_format="%.6g"))
    _plot(report, files["png"])
    data = report.to_dict()
    data["table"] = recorded_path(report.table, out)  # relative to validation.json: it travels with the table
    atomic_write_text(files["json"], json.dumps(data, indent=2) + "\n")


def _plot(report: ValidationReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    measured = rows["measured"].to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    lo, hi = 0.95 * min(measured.min(), rows["predicted"].min()), 1.05 * max(measured.max(), rows["predicted"].max())
    line = np.linspace(lo, hi, 50)
    for ax, column, figures, title in ((axes[0], "predicted", report.lut, "latency table (calibrated)"),
                                       (axes[1], "flops_proxy", report.flops, "FLOPs proxy (in-sample fit)")):
        ax.fill_between(line, line * 0.95, line * 1.05, color="tab:green", alpha=0.15, label="±5 %")
        ax.plot(line, line, color="black", linewidth=0.8, label="y = x")
        xerr = [np.clip(measured - rows["p10"], 0, None), np.clip(rows["p90"] - measured, 0, None)]
        ax.errorbar(measured, rows[column], xerr=xerr, fmt="o",
                    markersize=3, alpha=0.6, elinewidth=0.5, color="tab:blue", label="subnet (p10–p90)")
        ax.set_title(f"{title}\n±5 %: {figures['within_5pct']:.0%}, MAPE {figures['mape_pct']:.1f} %, "
                     f"τ {figures['kendall_tau']:.2f}", fontsize=9)
        ax.set_xlabel(f"measured {report.statistic} (ms)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted (ms)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{report.space} on {report.device_slug} ({report.backend}), {len(rows)} subnets", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".validation.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def print_report(report: ValidationReport, file: Any = None) -> None:
    file = file if file is not None else sys.stdout
    for warning in report.warnings:
        print(f"warning: {warning}", file=file)
    print(report.summary(), file=file)
