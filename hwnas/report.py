"""The files a search leaves behind: candidates.csv, pareto.csv, pareto.png, best.json, summary.md.

AttentiveNAS's search wrote no results; here every evaluated arch is on disk with its predicted
latency and accuracy, so a run can be re-plotted, seeded from (`hwnas search --seed-from`), or
exported (`hwnas export --arch results/RUN/best.json`) without searching again. Each file is
written atomically. Plots use matplotlib's Agg canvas directly, so no pyplot state or backend of
the caller is touched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.fileio import atomic_write_text
from hwnas.runrecord import RunRecord
from hwnas.search.result import SearchResult

FILES = ("candidates.csv", "pareto.csv", "pareto.png", "best.json", "summary.md")


def _md_table(frame: pd.DataFrame, columns: Sequence[str], formats: Mapping[str, str] | None = None) -> str:
    formats = formats or {}
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    values = {c: frame[c].tolist() for c in columns}  # per column, so integer columns stay integers
    for i in range(len(frame)):
        cells = []
        for c in columns:
            v = values[c][i]
            cells.append("" if isinstance(v, float) and math.isnan(v) else formats.get(c, "{}").format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_front(result: SearchResult, path: str | Path) -> Path:
    """Every candidate, the front and the budget line, accuracy over predicted latency."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cand = result.candidates
    feasible = cand["feasible"].to_numpy(dtype=bool)
    ax.scatter(cand["latency_ms"][feasible], cand["accuracy"][feasible], s=6, c="0.6", alpha=0.5, lw=0,
               label=f"candidates ({feasible.sum()})")
    if (~feasible).any():
        ax.scatter(cand["latency_ms"][~feasible], cand["accuracy"][~feasible], s=6, c="tab:red", alpha=0.3, lw=0,
                   label=f"over budget ({(~feasible).sum()})")
    metric = result.metric
    if metric != "accuracy":
        done = cand[cand[metric].notna()]
        ax.scatter(done["latency_ms"], done[metric], s=18, c="tab:green", marker="D",
                   label=f"confirmed ({len(done)})")
    front = result.front
    if len(front):
        ax.step(front["latency_ms"], front[metric], where="post", c="tab:blue", lw=1.2)
        ax.scatter(front["latency_ms"], front[metric], s=16, c="tab:blue", label=f"front ({len(front)})")
    if result.budget_ms is not None:
        ax.axvline(result.budget_ms, c="k", ls="--", lw=1, label=f"budget {result.budget_ms:g} ms")
    if result.best_row is not None:
        ax.scatter([result.best_row["latency_ms"]], [result.best_row[metric]], s=140, marker="*", c="gold",
                   edgecolors="k", zorder=5, label="best")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("accuracy" if metric == "accuracy" else f"accuracy ({metric})")
    ax.set_title(f"{result.strategy} on {result.space}: {len(cand)} candidates, seed {result.seed}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def summary_markdown(result: SearchResult, record: RunRecord, files: Mapping[str, Path]) -> str:
    """A page a person reads first: budget, best arch, population quality, the front, where the files are."""
    metric = result.metric
    lines = [f"# hwnas search: {result.strategy} on {result.space}", ""]
    rng = result.info.get("feasible_range_ms")
    budget = "none" if record.budget_ms is None else f"{record.budget_ms:g} ms"
    if record.search_budget_ms is not None:
        budget += f", searched under {record.search_budget_ms:.4g} ms (margin {record.margin:g})"
    if rng:
        how = "exact" if result.info.get("range_exact") else "estimated"
        budget += f" (space's predicted range {rng[0]:.4g}-{rng[1]:.4g} ms, {how})"
    lines += [f"- budget: {budget}", f"- seed: {result.seed}",
              f"- evaluated: {result.queries} archs; stopped: {result.stop_reason}"]
    for key, value in record.context_items():
        lines.append(f"- {key}: {value}")
    lines.append("")
    if result.best_row is None:
        lines += ["**No arch within the budget was evaluated.**", ""]
    else:
        row = result.best_row
        lines += ["## Best within the budget", "",
                  f"- arch_id: `{row['arch_id']}`",
                  f"- predicted latency: {row['latency_ms']:.4g} ms",
                  f"- {metric}: {row[metric]:.4g}"]
        if metric != "accuracy":
            lines.append(f"- accuracy the search saw: {row['accuracy']:.4g}")
        if not pd.isna(row["flops"]):
            lines.append(f"- FLOPs: {row['flops'] / 1e6:.2f} M, params: {row['params'] / 1e6:.3f} M")
        lines += ["", "```json", json.dumps(record.arch), "```", ""]
    hist = result.history
    if len(hist):
        per_step = "multiplier" in hist.columns  # the differentiable strategy logs its distribution per step
        lines += ["## The distribution per step" if per_step else "## Population quality per generation", ""]
        show = hist if len(hist) <= 12 else hist.iloc[np.unique(np.linspace(0, len(hist) - 1, 12).round().astype(int))]
        cols = [c for c in ("generation", "queries", "mean_accuracy", "std_accuracy", "best_accuracy",
                            "best_feasible_accuracy", "mean_latency_ms", "expected_latency_ms", "argmax_latency_ms",
                            "multiplier", "entropy", "loss", "rejected") if c in hist.columns]
        lines += [_md_table(show, cols, {c: "{:.4g}" for c in cols if c not in ("generation", "queries", "rejected")}),
                  ""]
    if len(result.front):
        front = result.front
        lines += [f"## Pareto front ({len(front)} archs, by {metric})", ""]
        show = front if len(front) <= 25 else front.iloc[np.unique(np.linspace(0, len(front) - 1, 25).round()
                                                                   .astype(int))]
        cols = ["arch_id", "latency_ms", "accuracy"] + (["confirmed_accuracy"] if metric != "accuracy" else []) + \
            ["feasible"]
        lines += [_md_table(show, cols, {"latency_ms": "{:.4g}", "accuracy": "{:.4g}",
                                         "confirmed_accuracy": "{:.4g}"}), ""]
    lines += ["## Files", ""] + [f"- {name}: `{path}`" for name, path in files.items()] + [""]
    return "\n".join(lines)


def write_report(result: SearchResult, out_dir: str | Path, record: RunRecord | None = None) -> dict[str, Path]:
    """Write the five files (and history.csv) into `out_dir` (created if needed); returns their paths by name.

    `record` is best.json (default: the result's own, with no context)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in FILES}
    atomic_write_text(files["candidates.csv"], result.candidates.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(files["pareto.csv"], result.front.to_csv(index=False, float_format="%.6g"))
    tmp = out / ".pareto.png.tmp.png"
    plot_front(result, tmp)
    tmp.replace(files["pareto.png"])
    record = record if record is not None else RunRecord.from_result(result)
    record.write(files["best.json"])
    history = out / "history.csv"
    atomic_write_text(history, result.history.to_csv(index=False, float_format="%.6g"))
    files["history.csv"] = history
    atomic_write_text(files["summary.md"], summary_markdown(result, record, files))
    return files


def read_front_archs(run_dir: str | Path) -> list[dict[str, Any]]:
    """The arch dicts of an earlier run's pareto.csv (what `--seed-from` starts a population from)."""
    from hwnas.errors import HwnasError

    path = Path(run_dir)
    if path.is_dir():
        path = path / "pareto.csv"
    if not path.is_file():
        raise HwnasError(f"{path}: no such file (--seed-from takes a results directory holding pareto.csv)")
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise HwnasError(f"{path}: not a readable CSV ({exc})") from None
    if "arch" not in frame.columns:
        raise HwnasError(f"{path}: no 'arch' column (not a pareto.csv written by hwnas search)")
    archs = []
    for line, text in enumerate(frame["arch"].astype(str), start=2):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise HwnasError(f"{path}: line {line}: column 'arch' is not JSON") from None
        if not isinstance(data, dict):
            raise HwnasError(f"{path}: line {line}: column 'arch' is not a JSON object")
        archs.append(data)
    return archs
