"""Does the search find better subnets than random search, for the same number of supernet evaluations?

On a trained supernet and a latency table, at three budgets (the 25th, 50th and 75th percentile of
the predicted latency of random subnets): the best validation accuracy that constrained evolution,
the differentiable search and random search find with the same number of supernet evaluations,
over several seeds, the test accuracy of each one's pick (the test split is touched only to report
the picks), its predicted latency over the budget and the wall time. Then the
hypervolume of NSGA's accuracy-latency front against random search's (same evaluations, a common
reference point: the space's slowest predicted latency and the lowest accuracy any run saw), how
NSGA's one front answers the three budgets, and the Kendall tau of an accuracy predictor fitted on
the random searches' (arch, validation accuracy) pairs, on held-out pairs.

    python benchmarks/search_quality.py --checkpoint runs/fmnist/supernet.pt \\
        --table latency_tables/mbv3-32/DEVICE__cpu-onnxruntime.csv --out bench/search_quality
    python benchmarks/search_quality.py ... --queries 300 --seeds 5 --device cuda

Cost: 3 budgets x 3 strategies x seeds x queries validation evaluations (plus NSGA and its
baseline: 2 x seeds x queries), fewer where archs repeat (evaluations are cached by arch_id). On a
CPU one evaluation of mbv3-32 on 5000 validation images takes about a second; --val-batches
trades precision for time. Writes OUT/runs.csv, OUT/fronts.csv, OUT/summary.json, OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.checkpoint import load_supernet
from hwnas.data import load_dataset
from hwnas.evaluation import resolve_device
from hwnas.fileio import atomic_write_text
from hwnas.latency.table import LatencyTable
from hwnas.search import differentiable_search, evolution_search, hypervolume, nsga_search, random_search
from hwnas.search.evaluate import SupernetEvaluator
from hwnas.search.predictor import AccuracyPredictor

QUANTILES = (0.25, 0.5, 0.75)
STRATEGIES = ("evolution", "differentiable", "random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="supernet checkpoint")
    parser.add_argument("--table", type=Path, required=True, help="latency table of the checkpoint's space")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--data", help="dataset spec (default: the checkpoint's)")
    parser.add_argument("--val-size", type=int, default=5000, help="as hwnas train carved it (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=200, help="supernet evaluations per search")
    parser.add_argument("--population", type=int, default=None, help="default: queries/8 within 8..50")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated, of " + ", ".join(STRATEGIES) + " (default: %(default)s)")
    parser.add_argument("--val-batches", type=int, default=None, help="cap on validation batches per evaluation")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--bn-batches", type=int, default=None, help="default: the checkpoint's bn_batches")
    parser.add_argument("--bn-batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--allow-mismatch", action="store_true", help="use a table of another space spec anyway")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    return parser.parse_args(argv)


def mean_std(values: pd.Series) -> str:
    return f"{values.mean():.2f} ± {values.std(ddof=0):.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not set(strategies) <= set(STRATEGIES) or not strategies:
        print(f"search_quality: --strategies takes {', '.join(STRATEGIES)}; got {args.strategies!r}", file=sys.stderr)
        return 2
    supernet, state = load_supernet(args.checkpoint)
    space = supernet.space
    table = LatencyTable.load(args.table)
    table.check_target(space, allow_mismatch=args.allow_mismatch)
    data = args.data or str(state.get("dataset") or "fashion-mnist").split(" (", 1)[0]
    dataset = load_dataset(data, val_size=args.val_size, seed=0)
    device = resolve_device(args.device)
    bn_batches = args.bn_batches or int(state.get("train_config", {}).get("bn_batches", 8))
    common = {"batch_size": args.batch_size, "bn_batches": bn_batches, "bn_batch_size": args.bn_batch_size,
              "device": device}
    val = SupernetEvaluator(supernet, dataset.val, dataset.train, max_batches=args.val_batches, **common)
    test = SupernetEvaluator(supernet, dataset.test, dataset.train, **common)
    population = args.population or min(50, max(8, args.queries // 8))
    rng = np.random.default_rng(0)
    sampled = table.predict_many([space.sample(rng) for _ in range(10000)])
    budgets = {q: float(np.quantile(sampled, q)) for q in QUANTILES}
    low, high = table.latency_range(space)
    print(f"{space.name} on {data}: predicted latency {low:.3f}-{high:.3f} ms; budgets "
          + ", ".join(f"q{int(100 * q)} {b:.3f} ms" for q, b in budgets.items())
          + f"; {args.queries} evaluations per search, population {population}, {args.seeds} seeds, {device}")

    rows: list[dict[str, Any]] = []
    pairs: dict[str, tuple[Any, float]] = {}
    for q, budget in budgets.items():
        for seed in range(args.seeds):
            for strategy in strategies:
                start = time.perf_counter()
                if strategy == "evolution":
                    result = evolution_search(space, val, table, budget, queries=args.queries, seed=seed,
                                              population_size=population, progress=args.progress, costs=False)
                elif strategy == "differentiable":
                    result = differentiable_search(space, val, table, budget, queries=args.queries, seed=seed,
                                                   progress=args.progress, costs=False)
                else:
                    result = random_search(space, val, table, budget, queries=args.queries, seed=seed,
                                           progress=args.progress, costs=False)
                    pairs.update({aid: (result.archs[aid], acc) for aid, acc in
                                  zip(result.candidates["arch_id"], result.candidates["accuracy"], strict=True)})
                row = result.best_row
                assert result.best is not None and row is not None and table.predict(result.best) <= budget
                rows.append({"budget_quantile": q, "budget_ms": budget, "strategy": strategy, "seed": seed,
                             "evaluations": result.queries, "best_arch_id": row["arch_id"],
                             "best_latency_ms": row["latency_ms"], "latency_over_budget": row["latency_ms"] / budget,
                             "best_val_acc": row["accuracy"],
                             "best_test_acc": test.evaluate(result.best), "seconds": time.perf_counter() - start,
                             "arch": row["arch"]})
                print(f"  q{int(100 * q)} {strategy:14s} seed {seed}: val {row['accuracy']:.2f} test "
                      f"{rows[-1]['best_test_acc']:.2f} at {row['latency_ms']:.3f} ms ({rows[-1]['seconds']:.0f} s)")
    runs = pd.DataFrame(rows)

    fronts: list[dict[str, Any]] = []
    results = {}
    for seed in range(args.seeds):
        results[("nsga", seed)] = nsga_search(space, val, table, None, queries=args.queries, seed=seed,
                                              population_size=population, progress=args.progress, costs=False)
        rand = random_search(space, val, table, high, queries=args.queries, seed=seed, progress=args.progress,
                             costs=False)
        pairs.update({aid: (rand.archs[aid], acc) for aid, acc in
                      zip(rand.candidates["arch_id"], rand.candidates["accuracy"], strict=True)})
        results[("random", seed)] = rand
    ref_acc = min(float(r.candidates["accuracy"].min()) for r in results.values())
    for (strategy, seed), result in results.items():
        entry: dict[str, Any] = {
            "strategy": strategy, "seed": seed, "evaluations": result.queries, "front_size": len(result.front),
            "hypervolume": hypervolume(result.candidates["latency_ms"], result.candidates["accuracy"], high, ref_acc)}
        for q, budget in budgets.items():
            picked = result.best_under(budget, table)
            entry[f"best_val_q{int(100 * q)}"] = float(picked[1]["accuracy"]) if picked else float("nan")
        fronts.append(entry)
    front_frame = pd.DataFrame(fronts)

    archs = [a for a, _ in pairs.values()]
    predictor = AccuracyPredictor(space, "auto", seed=0)
    fit = predictor.fit(archs, [acc for _, acc in pairs.values()])
    print(fit.describe(), {k: round(v, 3) for k, v in fit.taus.items()})

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "runs.csv", runs.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(args.out / "fronts.csv", front_frame.to_csv(index=False, float_format="%.6g"))
    per_budget: list[dict[str, Any]] = []
    for q in QUANTILES:
        part = runs[runs["budget_quantile"] == q]
        nsga = front_frame[front_frame["strategy"] == "nsga"][f"best_val_q{int(100 * q)}"]
        entry: dict[str, Any] = {"quantile": q, "budget_ms": budgets[q], "nsga_front_val": float(nsga.mean())}
        cells = [f"q{int(100 * q)} ({budgets[q]:.3f} ms)"]
        for strategy in strategies:
            runs_s = part[part["strategy"] == strategy]
            entry[strategy] = {"val": float(runs_s["best_val_acc"].mean()),
                               "test": float(runs_s["best_test_acc"].mean()),
                               "latency_over_budget_mean": float(runs_s["latency_over_budget"].mean()),
                               "latency_over_budget_min": float(runs_s["latency_over_budget"].min()),
                               "seconds": float(runs_s["seconds"].mean())}
            cells.append(f"{strategy}: {mean_std(runs_s['best_val_acc'])} / {mean_std(runs_s['best_test_acc'])} / "
                         f"{runs_s['latency_over_budget'].min():.3f}-{runs_s['latency_over_budget'].max():.3f} / "
                         f"{runs_s['seconds'].mean():.0f} s")
        if {"evolution", "random"} <= set(strategies):
            evo = part[part["strategy"] == "evolution"].set_index("seed")["best_val_acc"]
            rnd = part[part["strategy"] == "random"].set_index("seed")["best_val_acc"]
            entry["evolution_wins_val"], entry["ties_val"] = int((evo > rnd).sum()), int((evo == rnd).sum())
        entry["table"] = "| " + " | ".join(cells) + f" | {mean_std(nsga)} |"
        per_budget.append(entry)
    hv = front_frame.groupby("strategy")["hypervolume"]
    summary = {
        "checkpoint": str(args.checkpoint), "table": str(args.table), "dataset": data, "space": space.name,
        "queries": args.queries, "population": population, "seeds": args.seeds, "device": str(device),
        "strategies": strategies,
        "validation_images": val.images, "bn_batches": bn_batches, "budgets_ms": budgets,
        "per_budget": [{k: v for k, v in b.items() if k != "table"} for b in per_budget],
        "hypervolume": {k: float(v) for k, v in hv.mean().items()},
        "hypervolume_reference": [high, ref_acc],
        "predictor": {"kind": fit.kind, "kendall_tau": fit.kendall_tau, "taus": fit.taus, "pairs": len(archs),
                      "holdout": fit.n_holdout},
        "supernet_evaluations": {"validation": val.evaluations, "test": test.evaluations},
    }
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Search quality: {space.name}, {args.queries} supernet evaluations per search, {args.seeds} seeds", "",
        f"Checkpoint `{args.checkpoint}`, table `{args.table}`, {data} (validation: {val.images} images; "
        f"BN re-estimated on {bn_batches} training batches). Best validation accuracy (%) found, and the test "
        "accuracy of that pick; mean ± std over seeds. NSGA: one run per seed, its front read at each budget.", "",
        "Each cell: validation % / test % / predicted latency over the budget (min-max) / wall time per search.", "",
        "| budget | " + " | ".join(strategies) + " | NSGA front val |",
        "|---|" + "---|" * len(strategies) + "---|",
        *[b["table"] for b in per_budget], "",
        *([f"Evolution beat random on validation in {sum(b['evolution_wins_val'] for b in per_budget)} of "
           f"{len(QUANTILES) * args.seeds} (budget, seed) pairs ({sum(b['ties_val'] for b in per_budget)} ties).", ""]
          if {"evolution", "random"} <= set(strategies) else []),
        f"Hypervolume (ms x accuracy points, reference {high:.3f} ms / {ref_acc:.2f} %): "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary["hypervolume"].items()) + ".", "",
        f"Accuracy predictor on {len(archs)} (arch, validation accuracy) pairs of the random searches: "
        f"{fit.describe()}; ridge {fit.taus.get('ridge', float('nan')):.3f}, "
        f"MLP {fit.taus.get('mlp', float('nan')):.3f}.", "",
    ]
    atomic_write_text(args.out / "summary.md", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}/runs.csv, fronts.csv, summary.json, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
