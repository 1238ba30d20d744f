"""hwnas's evolution against Once-for-All's tutorial `EvolutionFinder`, side by side on the same work.

Both search OFA's MobileNetV3 space (hwnas `mbv3-224`: the same depths, kernels, expansions and
the resolutions 160-224 of OFA's `ArchManager`) under one latency budget, with the same latency
table (`--table`, by default the committed mbv3-224 ONNX Runtime table of this CPU, or any
mbv3-224 table) and the same accuracy predictor (hwnas's `AccuracyPredictor`, an MLP as OFA's,
fitted on synthetic (arch, accuracy) pairs from benchmarks/search_speed.py). OFA runs its
defaults: 500 generations of a population of 100, so 100 + 500 x 100 = 50,100 accuracy
predictions; hwnas's evolution gets the same 50,100 queries with a population of 100.

OFA's finder asks its two predictors about one OFA sample dict at a time (latency) or a list of
them (accuracy); the adapters convert a sample to an hwnas `Arch` once and cache it, so OFA pays
the table's and the predictor's own cost, as hwnas does, plus a dict lookup.

Budgets sit at the 1 %, 25 % and 50 % quantiles of 5,000 random subnets' predicted latency. For
each budget and seed, the two searches run back to back, in alternating order (interleaved: the
host's slow spells hit both). Each run's time is the search call alone (fitting the predictor is
not timed); its result is the best arch's predicted accuracy, and "found the best" means it equals
the best predicted accuracy any run of either searcher found at that budget.

    python benchmarks/ofa_finder.py --seeds 5 --out benchmarks/results/ofa_finder
    python benchmarks/ofa_finder.py --seeds 1 --generations 20 --out /tmp/ofa_finder   # a quick check

Timing: run it alone on a quiet machine (the quiet guard's readings are kept with the results).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hwnas import spaces
from hwnas.arch import Arch
from hwnas.latency import quiet
from hwnas.latency.table import LatencyTable
from hwnas.ofa_import import arch_from_ofa, ofa_version
from hwnas.provenance import git_commit
from hwnas.search import STRATEGIES
from hwnas.search.predictor import AccuracyPredictor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_speed import synthetic_accuracy  # noqa: E402 - a sibling benchmark script, not a package

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "latency_tables" / "mbv3-224" / "cpu-amd-epyc-f25m1-1t__cpu-onnxruntime.csv"
RESULTS = ROOT / "benchmarks" / "results" / "ofa_finder"
SPACE = spaces.get("mbv3-224")


def _key(sample: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sample["ks"]), tuple(sample["e"]), tuple(sample["d"]), sample["r"][0]


class OfaLatency:
    """OFA's efficiency predictor interface over an hwnas latency table."""

    def __init__(self, table: LatencyTable) -> None:
        self.table = table
        self.cache: dict[tuple[Any, ...], Arch] = {}
        self.calls = 0

    def arch(self, sample: dict[str, Any]) -> Arch:
        key = _key(sample)
        arch = self.cache.get(key)
        if arch is None:
            arch = self.cache[key] = arch_from_ofa(SPACE, sample)
        return arch

    def predict_efficiency(self, sample: dict[str, Any]) -> float:
        self.calls += 1
        return float(self.table.predict(self.arch(sample)))


class OfaAccuracy:
    """OFA's accuracy predictor interface over hwnas's `AccuracyPredictor` (one batch per generation, as OFA's)."""

    def __init__(self, predictor: AccuracyPredictor, latency: OfaLatency) -> None:
        self.predictor, self.latency = predictor, latency

    def predict_accuracy(self, samples: list[dict[str, Any]]) -> Any:
        import torch

        return torch.as_tensor(self.predictor.evaluate_many([self.latency.arch(s) for s in samples]))


def run_ofa(table: LatencyTable, predictor: AccuracyPredictor, budget: float, seed: int, generations: int,
            population: int) -> dict[str, Any]:
    EvolutionFinder = _ofa_finder_class()
    latency = OfaLatency(table)
    random.seed(seed)
    np.random.seed(seed)
    finder = EvolutionFinder("note10", 30, latency, OfaAccuracy(predictor, latency), population_size=population,
                             max_time_budget=generations)
    finder.set_efficiency_constraint(budget)  # OFA's constructor checks its own ms range; the budget is ours
    started = time.perf_counter()
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        _, (accuracy, sample, lat) = finder.run_evolution_search()
    seconds = time.perf_counter() - started
    arch = arch_from_ofa(SPACE, sample)
    return {"searcher": "ofa", "seconds": seconds, "accuracy": float(accuracy), "latency_ms": float(lat),
            "arch_id": arch.arch_id, "latency_calls": latency.calls, "over_budget": float(lat) > budget}


def run_hwnas(space: Any, table: LatencyTable, predictor: AccuracyPredictor, budget: float, seed: int,
              generations: int, population: int) -> dict[str, Any]:
    started = time.perf_counter()
    result = STRATEGIES["evolution"](space, predictor, table, budget, queries=population * (generations + 1),
                                     population_size=population, seed=seed, costs=False)
    seconds = time.perf_counter() - started
    row = result.best_row
    assert result.best is not None and row is not None
    lat = float(table.predict(result.best))
    return {"searcher": "hwnas", "seconds": seconds, "accuracy": float(row["accuracy"]), "latency_ms": lat,
            "arch_id": result.best.arch_id, "latency_calls": None, "over_budget": lat > budget,
            "stop": result.info.get("stop")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE, help="an mbv3-224 latency table")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.01, 0.25, 0.5])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--generations", type=int, default=500)
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=1000, help="(arch, accuracy) pairs the predictor is fitted on")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        import ofa  # noqa: F401
    except ImportError:
        print("ofa_finder: needs Once-for-All's package: pip install ofa", file=sys.stderr)
        return 2

    space = spaces.get("mbv3-224")
    table = LatencyTable.load(args.table)
    table.check_target(space)
    rng = np.random.default_rng(0)
    pairs = [space.sample(rng) for _ in range(args.pairs)]
    predictor = AccuracyPredictor(space, "mlp", seed=0)
    fit = predictor.fit(pairs, synthetic_accuracy(space, pairs))
    random_lat = table.predict_many([space.sample(rng) for _ in range(5000)])
    runs: list[dict[str, Any]] = []
    loads: list[dict[str, float]] = []
    for q in args.quantiles:
        budget = float(np.quantile(random_lat, q))
        for seed in range(args.seeds):
            order = ("hwnas", "ofa") if seed % 2 == 0 else ("ofa", "hwnas")
            for who in order:
                before = quiet.snapshot()
                if who == "ofa":
                    row = run_ofa(table, predictor, budget, seed, args.generations, args.population)
                else:
                    row = run_hwnas(space, table, predictor, budget, seed, args.generations, args.population)
                after = quiet.snapshot()
                busy = quiet.reading(before, after).to_dict() if before and after else {}
                loads.append(busy)
                row.update(quantile=q, budget_ms=budget, seed=seed, others_busy=busy.get("others_busy"))
                runs.append(row)
                print(f"q{q:g} seed {seed} {who}: {row['seconds']:.2f} s, predicted accuracy {row['accuracy']:.4f} "
                      f"at {row['latency_ms']:.3f} ms (budget {budget:.3f})", file=sys.stderr, flush=True)

    summary = []
    for q in args.quantiles:
        at = [r for r in runs if r["quantile"] == q]
        best = max(r["accuracy"] for r in at)
        line: dict[str, Any] = {"quantile": q, "budget_ms": at[0]["budget_ms"], "best_accuracy": best}
        for who in ("hwnas", "ofa"):
            mine = [r for r in at if r["searcher"] == who]
            line[f"{who}_median_s"] = float(np.median([r["seconds"] for r in mine]))
            line[f"{who}_found_best"] = sum(r["accuracy"] >= best - 1e-9 for r in mine)
            line[f"{who}_over_budget"] = sum(bool(r["over_budget"]) for r in mine)
        # per seed, the two runs back to back: the ratio of each pair, then the median of those
        ratios = [o["seconds"] / h["seconds"] for h in at if h["searcher"] == "hwnas"
                  for o in at if o["searcher"] == "ofa" and o["seed"] == h["seed"]]
        line["speedup_median"] = float(np.median(ratios))
        line["speedup_min"] = float(np.min(ratios))
        summary.append(line)
    busy_values = [b["others_busy"] for b in loads if b]
    header = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "table": str(args.table.resolve().relative_to(ROOT)) if args.table.resolve().is_relative_to(ROOT)
              else str(args.table), "device": table.meta.get("device_slug"), "predictor": fit.describe(),
              "generations": args.generations, "population": args.population, "seeds": args.seeds,
              "ofa_version": ofa_version(), "other_cpus_busy_max": max(busy_values) if busy_values else None,
              "other_cpus_busy_median": float(np.median(busy_values)) if busy_values else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps({"header": header, "runs": runs, "summary": summary},
                                                   indent=2) + "\n")
    lines = ["# hwnas evolution vs Once-for-All's EvolutionFinder: the same table, predictor and work", "",
             f"- commit {header['commit']}, {header['date']}, table `{header['table']}` ({header['device']}), "
             f"ofa {header['ofa_version']}", f"- {args.generations} generations x {args.population} (OFA's "
             f"defaults; hwnas: the same {args.population * (args.generations + 1)} queries), {args.seeds} seeds "
             "per budget, the two searches back to back in alternating order; predictor: " + fit.describe(),
             f"- other CPU busy while timing: median {100 * (header['other_cpus_busy_median'] or 0):.0f} %, "
             f"max {100 * (header['other_cpus_busy_max'] or 0):.0f} %", "",
             "| budget (quantile) | hwnas median s | OFA median s | speed-up (median, min of pairs) "
             "| found the best: hwnas / OFA | over budget: hwnas / OFA |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['budget_ms']:.3f} ms (q{s['quantile']:g}) | {s['hwnas_median_s']:.2f} | "
                     f"{s['ofa_median_s']:.2f} | {s['speedup_median']:.2f}x, {s['speedup_min']:.2f}x | "
                     f"{s['hwnas_found_best']} / {s['ofa_found_best']} of {args.seeds} | "
                     f"{s['hwnas_over_budget']} / {s['ofa_over_budget']} |")
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


def _ofa_finder_class() -> Any:
    """OFA's `EvolutionFinder`, loaded from its file: `ofa.tutorial`'s package init imports yaml, gdown and the
    ImageNet helpers, none of which the finder uses."""
    import importlib.util

    spec = importlib.util.find_spec("ofa")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "tutorial" / "evolution_finder.py"
    module_spec = importlib.util.spec_from_file_location("ofa_evolution_finder", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.EvolutionFinder


if __name__ == "__main__":
    sys.exit(main())
