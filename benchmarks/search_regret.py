"""How far below the best arch under the budget does each searcher stop? Regret on benchmarks with a known optimum.

Two benchmarks, every searcher at three budgets x `--seeds` seeds x `--queries` queries, through
the public search protocols only (`hwnas/search/protocols.py`), random search in the same run:

- `mbv3-32-tabular`: `--archs` random mbv3-32 subnets evaluated once on the shipped Fashion-MNIST
  supernet (validation accuracy after BN re-estimation; `build` writes them, with the committed
  table's predicted latency, to benchmarks/results/search_regret/mbv3-32_tabular.csv). The space is
  that set of archs (`TabularSpace`): sampling draws one, mutation moves to a near neighbour in
  gene space, crossover to the archs nearest a uniform crossover of two, and a gene codec projects
  any gene row onto the nearest arch of the set, so the differentiable searcher runs on it too.
- `isolated`: a synthetic space of 8 genes x 4 choices whose accuracy is a smooth function of
  latency plus a few isolated optima (narrow peaks away from the budget's edge, at half the budget
  and below): the case where a searcher that pushes every child to the budget misses the optimum.

Regret is the accuracy (points) of the best arch within the budget minus that of the arch returned.

    python benchmarks/search_regret.py build --archs 2500       # the tabular benchmark's data (once)
    python benchmarks/search_regret.py run --seeds 20 --queries 300 --out benchmarks/results/search_regret
    python benchmarks/search_regret.py run --benchmarks isolated --out benchmarks/results/search_regret/isolated
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

RESULTS = Path(__file__).resolve().parent / "results" / "search_regret"
TABULAR = RESULTS / "mbv3-32_tabular.csv"


def build(args: argparse.Namespace) -> None:
    """Evaluate `--archs` random mbv3-32 subnets on the shipped supernet (resumable: rows are kept as they come)."""
    from hwnas.checkpoint import load_supernet
    from hwnas.data import load_dataset
    from hwnas.demo import shipped_supernet
    from hwnas.fileio import atomic_write_text, display_path
    from hwnas.latency.catalog import find_table
    from hwnas.latency.profiles import load_profile
    from hwnas.provenance import git_commit
    from hwnas.search.evaluate import SupernetEvaluator

    supernet, _ = load_supernet(shipped_supernet())
    space = supernet.space
    table, _ = find_table(space, load_profile("cpu-onnxruntime"))
    if table is None:
        raise SystemExit("search_regret build: no committed mbv3-32 cpu-onnxruntime table matches this machine")
    dataset = load_dataset("fashion-mnist", val_size=5000, seed=0)
    evaluator = SupernetEvaluator(supernet, dataset.val, dataset.train, batch_size=500, max_batches=args.val_batches,
                                  bn_batches=args.bn_batches, bn_batch_size=256, device="cpu", seed=0)
    rng = np.random.default_rng(args.seed)
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(args.archs)))
    rows = pd.read_csv(TABULAR).to_dict("records") if TABULAR.is_file() else []
    done = {r["arch_id"] for r in rows}
    todo = [a for a in archs if a.arch_id not in done]
    started = time.perf_counter()
    for i, arch in enumerate(todo):
        rows.append({"arch_id": arch.arch_id, "arch": arch.to_json(), "accuracy": evaluator.evaluate(arch),
                     "latency_ms": float(table.predict(arch)), "flops": space.flops_params(arch)[0]})
        if (i + 1) % 50 == 0 or i + 1 == len(todo):
            RESULTS.mkdir(parents=True, exist_ok=True)
            atomic_write_text(TABULAR, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
            rate = (i + 1) / (time.perf_counter() - started)
            print(f"{len(rows)}/{len(archs)} archs evaluated ({rate:.2f}/s)", file=sys.stderr, flush=True)
    meta = {"archs": len(rows), "supernet": shipped_supernet().name, "table": display_path(table.path),
            "validation_images": evaluator.images, "bn_batches": args.bn_batches, "seed": args.seed,
            "commit": git_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    atomic_write_text(TABULAR.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


# ---- the tabular benchmark as a space of its own ------------------------------------------------------------
class TabularSpace:
    """The archs of the tabular benchmark as a search space: only they exist (see the module doc)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        from hwnas import spaces
        from hwnas.arch import Arch

        self.base = spaces.get("mbv3-32")
        self.name = self.base.name
        self.archs = [Arch.from_json(a) for a in frame["arch"]]
        self.index = {a: i for i, a in enumerate(self.archs)}
        self.latency = frame["latency_ms"].to_numpy(dtype=float)
        self.accuracy = frame["accuracy"].to_numpy(dtype=float)
        self.features = self.base.encode_many(self.archs)
        self.encoding_size = self.features.shape[1]
        self.neighbours = np.argsort(self._distances(self.features), axis=1)[:, 1:11]  # the 10 nearest, self aside

    def _distances(self, x: np.ndarray) -> np.ndarray:
        f = self.features
        return (f.sum(1)[None, :] + x.sum(1)[:, None] - 2 * x @ f.T)

    def nearest(self, x: np.ndarray) -> list[Any]:
        return [self.archs[int(i)] for i in np.argmin(self._distances(np.atleast_2d(x)), axis=1)]

    def sample(self, rng: Any = None) -> Any:
        return self.archs[int(np.random.default_rng(rng).integers(len(self.archs)))] if not isinstance(
            rng, np.random.Generator) else self.archs[int(rng.integers(len(self.archs)))]

    def mutate(self, arch: Any, rng: Any = None, prob: float = 0.1) -> Any:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return self.archs[int(rng.choice(self.neighbours[self.index[arch]]))]

    def crossover(self, a: Any, b: Any, rng: Any = None) -> Any:
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        fa, fb = self.features[self.index[a]], self.features[self.index[b]]
        return self.nearest(np.where(rng.random(fa.shape) < 0.5, fa, fb))[0]

    def smallest(self) -> Any:
        return self.archs[int(np.argmin(self.latency))]

    def largest(self) -> Any:
        return self.archs[int(np.argmax(self.latency))]

    def validate(self, arch: Any) -> Any:
        from hwnas.errors import ArchError

        if arch not in self.index:
            raise ArchError(f"arch {getattr(arch, 'arch_id', arch)} is not in the tabular benchmark")
        return arch

    def encode(self, arch: Any) -> np.ndarray:
        return self.features[self.index[arch]]

    def gene_codec(self) -> TabularCodec:
        return TabularCodec(self)


class TabularCodec:
    """mbv3-32's gene rows, decoded to the nearest arch of the table: the differentiable search's genes."""

    def __init__(self, space: TabularSpace) -> None:
        self.space, self.inner = space, space.base.gene_codec()
        self.cardinality = self.inner.cardinality

    def genes(self, archs: Any, rng: np.random.Generator) -> np.ndarray:
        return self.inner.genes(archs, rng)

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.inner.random(n, rng)

    def decode(self, genes: np.ndarray) -> list[Any]:
        return self.space.nearest(self.space.base.encode_many(self.inner.decode(genes)))

    def mutate(self, genes: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
        return self.inner.mutate(genes, rng, prob)

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.inner.crossover(a, b, rng)


class Lookup:
    """Latency (`predict`) and accuracy (`evaluate`) of a benchmark's archs, looked up."""

    def __init__(self, index: dict[Any, int], latency: np.ndarray, accuracy: np.ndarray) -> None:
        self.index, self.lat, self.acc = index, latency, accuracy
        self.calls = 0

    def predict(self, arch: Any) -> float:
        return float(self.lat[self.index[arch]])

    def predict_many(self, archs: Any) -> np.ndarray:
        return self.lat[[self.index[a] for a in archs]]

    def latency_range(self, space: Any) -> tuple[float, float]:
        return float(self.lat.min()), float(self.lat.max())

    def evaluate(self, arch: Any) -> float:
        self.calls += 1
        return float(self.acc[self.index[arch]])


# ---- a synthetic space with isolated optima ------------------------------------------------------------------
class Genes(tuple):  # noqa: SLOT001 - a plain tuple of choices, with what a searcher needs of an arch
    """One arch of the isolated space: its choices, with an id and a JSON form."""

    @property
    def arch_id(self) -> str:
        return "g" + "".join(map(str, self))

    def to_json(self) -> str:
        return json.dumps(list(self))


class IsolatedSpace:
    """8 genes x 4 choices; accuracy rises gently with latency, and three narrow peaks (6 points at the peak,
    halving with each gene away, nothing beyond three) sit at the 15th, 30th and 45th latency percentiles:
    well under the budgets of the benchmark, so a searcher that pushes every child to the budget misses them."""

    name = "isolated"
    genes_n, choices = 8, 4

    def __init__(self, seed: int = 5) -> None:
        import itertools

        from hwnas.examples.cell_space import _rng

        self._rng = _rng
        rng = np.random.default_rng(seed)
        cost = np.sort(rng.uniform(0.05, 1.0, size=(self.genes_n, self.choices)), axis=1)
        all_genes = np.array(list(itertools.product(range(self.choices), repeat=self.genes_n)))
        lat = 1.0 + cost[np.arange(self.genes_n), all_genes].sum(axis=1)
        smooth = 50 + 8 * (lat - lat.min()) / (lat.max() - lat.min())
        noise = rng.normal(0, 0.4, size=(self.genes_n, self.choices))
        acc = smooth + noise[np.arange(self.genes_n), all_genes].sum(axis=1)
        order = np.argsort(lat)
        for q in (0.15, 0.3, 0.45):  # a peak at each of these latency quantiles, falling off within 3 genes of it
            peak = all_genes[order[int(q * len(order))]]
            distance = (all_genes != peak).sum(axis=1)
            acc += np.where(distance <= 3, 6.0 * 0.5**distance, 0.0)
        self.all_genes, self.lat, self.acc = all_genes, lat, acc
        self.archs = [Genes(int(v) for v in g) for g in all_genes]
        self.index = {a: i for i, a in enumerate(self.archs)}
        self.encoding_size = self.genes_n * self.choices

    def sample(self, rng: Any = None) -> Any:
        return self.archs[int(self._rng(rng).integers(len(self.archs)))]

    def mutate(self, arch: Any, rng: Any = None, prob: float = 0.1) -> Any:
        rng = self._rng(rng)
        genes = np.array(arch)
        hit = rng.random(self.genes_n) < prob
        genes[hit] = rng.integers(self.choices, size=int(hit.sum()))
        if tuple(genes) == arch:
            g = int(rng.integers(self.genes_n))
            genes[g] = (genes[g] + 1 + rng.integers(self.choices - 1)) % self.choices
        return Genes(int(v) for v in genes)

    def crossover(self, a: Any, b: Any, rng: Any = None) -> Any:
        take = self._rng(rng).random(self.genes_n) < 0.5
        return Genes(int(x if t else y) for x, y, t in zip(a, b, take, strict=True))

    def smallest(self) -> Any:
        return Genes((0,) * self.genes_n)

    def largest(self) -> Any:
        return Genes((self.choices - 1,) * self.genes_n)

    def validate(self, arch: Any) -> Any:
        return arch

    def encode(self, arch: Any) -> np.ndarray:
        x = np.zeros(self.encoding_size, dtype=np.float32)
        x[np.arange(self.genes_n) * self.choices + np.array(arch)] = 1
        return x

    def gene_codec(self) -> IsolatedCodec:
        return IsolatedCodec(self)


class IsolatedCodec:
    def __init__(self, space: IsolatedSpace) -> None:
        self.cardinality = np.full(space.genes_n, space.choices)
        self.n = space.genes_n

    def genes(self, archs: Any, rng: np.random.Generator) -> np.ndarray:
        return np.array(archs, dtype=np.int64).reshape(-1, self.n)

    def random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.cardinality, size=(n, self.n))

    def decode(self, genes: np.ndarray) -> list[Any]:
        return [Genes(int(v) for v in row) for row in np.asarray(genes).reshape(-1, self.n)]

    def mutate(self, genes: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
        return np.where(rng.random(genes.shape) < prob, self.random(len(genes), rng), genes)

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.where(rng.random(a.shape) < 0.5, b, a)


SEARCHERS = {
    "evolution": ("evolution", {}),
    "evolution-age": ("evolution", {"survivors": "age"}),
    "nsga": ("nsga", {}),
    "differentiable": ("differentiable", {}),
    "random": ("random", {}),
}


def benchmarks(tabular: Path) -> dict[str, tuple[Any, Lookup]]:
    out: dict[str, tuple[Any, Lookup]] = {}
    if tabular.is_file():
        space = TabularSpace(pd.read_csv(tabular))
        out["mbv3-32-tabular"] = (space, Lookup(space.index, space.latency, space.accuracy))
    iso = IsolatedSpace()
    out["isolated"] = (iso, Lookup(iso.index, iso.lat, iso.acc))
    return out


def run(args: argparse.Namespace) -> None:
    """Every searcher on every benchmark, at 3 budgets x `--seeds` seeds; regret against the exact optimum."""
    from hwnas.provenance import git_commit
    from hwnas.search import STRATEGIES

    rows = []
    sizes: dict[str, int] = {}
    for bench, (space, lookup) in benchmarks(args.tabular).items():
        if bench not in args.benchmarks:
            continue
        sizes[bench] = len(lookup.lat)
        lat, acc = lookup.lat, lookup.acc
        for q in args.quantiles:
            budget = float(np.quantile(lat, q))
            best = float(acc[lat <= budget].max())
            for name, (strategy, options) in SEARCHERS.items():
                if name not in args.searchers:
                    continue
                for seed in range(args.seeds):
                    row: dict[str, Any] = {"benchmark": bench, "quantile": q, "budget_ms": budget, "searcher": name,
                                           "seed": seed, "optimum": best}
                    started = time.perf_counter()
                    opts = {"queries": args.queries, "seed": seed, "costs": False, **options}
                    if strategy in ("evolution", "nsga"):
                        opts["population_size"] = args.population
                    try:
                        result = STRATEGIES[strategy](space, lookup, lookup, budget, **opts)
                        picked = result.best
                        row.update(accuracy=float(acc[lookup.index[picked]]) if picked is not None else np.nan,
                                   latency_ms=float(lat[lookup.index[picked]]) if picked is not None else np.nan,
                                   failed="" if picked is not None else "no arch returned",
                                   evaluated=len(result.candidates))
                    except Exception as exc:  # noqa: BLE001 - a failure is a result here, counted and named
                        row.update(accuracy=np.nan, latency_ms=np.nan, failed=f"{type(exc).__name__}: {exc}",
                                   evaluated=0)
                    row["seconds"] = time.perf_counter() - started
                    row["regret"] = best - row["accuracy"] if np.isfinite(row["accuracy"]) else np.nan
                    row["over_budget"] = bool(np.isfinite(row["latency_ms"]) and row["latency_ms"] > budget)
                    rows.append(row)
            print(f"{bench} q{q:g} done", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    summary = (frame.groupby(["benchmark", "quantile", "searcher"], sort=False)
               .agg(mean_regret=("regret", "mean"), found_optimum=("regret", lambda r: float((r <= 1e-9).mean())),
                    over_budget=("over_budget", "sum"), failures=("failed", lambda f: int((f != "").sum())),
                    seconds=("seconds", "mean")).reset_index())
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "runs.csv", index=False, float_format="%.6g")
    header = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seeds": args.seeds, "queries": args.queries, "population": args.population,
              "quantiles": list(args.quantiles), "archs_per_benchmark": sizes}
    (args.out / "summary.json").write_text(json.dumps({"header": header, "summary": summary.to_dict("records")},
                                                      indent=2) + "\n")
    lines = ["# Regret of every searcher (accuracy points below the best arch within the budget)", "",
             f"- commit {header['commit']}, {header['date']}; {args.seeds} seeds x {args.queries} queries, "
             f"population {args.population}; archs per benchmark {sizes};"
             f" budgets at the {', '.join(f'{q:g}' for q in args.quantiles)} "
             "quantiles of each benchmark's latency", "",
             "| benchmark | budget quantile | searcher | mean regret | seeds finding the optimum | over budget "
             "| failures | s per search |", "|---|---|---|---|---|---|---|---|"]
    for r in summary.to_dict("records"):
        lines.append(f"| {r['benchmark']} | {r['quantile']:g} | {r['searcher']} | {r['mean_regret']:.3f} | "
                     f"{100 * r['found_optimum']:.0f} % | {int(r['over_budget'])} | {int(r['failures'])} | "
                     f"{r['seconds']:.2f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="evaluate the tabular benchmark's archs on the shipped supernet")
    b.add_argument("--archs", type=int, default=2500)
    b.add_argument("--val-batches", type=int, default=2, help="validation batches of 500 per evaluation")
    b.add_argument("--bn-batches", type=int, default=2)
    b.add_argument("--seed", type=int, default=2026)
    r = sub.add_parser("run", help="every searcher on both benchmarks")
    r.add_argument("--seeds", type=int, default=20)
    r.add_argument("--queries", type=int, default=300)
    r.add_argument("--population", type=int, default=30)
    r.add_argument("--quantiles", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    r.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=list(SEARCHERS))
    r.add_argument("--benchmarks", nargs="+", default=["mbv3-32-tabular", "isolated"],
                   choices=["mbv3-32-tabular", "isolated"])
    r.add_argument("--tabular", type=Path, default=TABULAR)
    r.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.action == "build":
        build(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
