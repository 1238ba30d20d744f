"""How to time a model on a shared VM so that the number repeats: schedules and statistics, side by side.

`benchmarks/slow_mode.py` shows the trouble: on the 2-vCPU development VM a model runs in a quick or
a slow mode (about 1.7x apart for a 32 px subnet) in spells of seconds, with the other vCPU busy or
not (a host core shared with another tenant shows as nothing in the VM). A timing whose rounds all
fall in one spell measures the spell. This benchmark times the same subnets (mbv3-32 and mbv3-224,
ONNX Runtime, 1 thread, batch 1, as `cpu-onnxruntime`) with several schedules, each repeated
`--reps` times, all interleaved, and reports how well each repeats itself and what it costs:

- `chunk3`: groups of 8, 3 interleaved rounds back to back, the quickest round kept (the profiler's
  schedule before this benchmark);
- `chunk8`: the same with 8 rounds;
- `spread3`, `spread8`: 3 or 8 rounds over the whole set (rounds seconds apart), the quickest kept;
- `gated3`: `spread3`, each item-round bracketed by a sentinel (a small fixed model timed for 8 ms);
  a round the sentinel did not see in its quick mode before and after is timed again, after
  waiting for the quick mode (at most `--max-wait`, `--retries` times);
- `gated3n`: `gated3`, each round scaled by the sentinel's speed against its speed at the start
  (does a drift of the quick mode itself cancel out?);
- `confirm3`: 3 rounds over the whole set, then more (up to `--max-rounds`) for the items whose
  two quickest rounds do not yet agree within `--confirm` (what the profiler now does, in groups).

A round times at most `--round-ms` of calls (at least 5, at most 100) after a warm-up of a fifth as
many, so a 20 ms subnet costs what a 0.2 ms block does. The figure of merit is how far one
schedule's estimates of a subnet lie from each other across repetitions (max/min - 1) and from the
subnet's quick-mode reference (the 10th percentile of every estimate of it). Nothing else may run.

    python benchmarks/timing_schedule.py --reps 4 --out benchmarks/results/timing_schedule
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SCHEDULES = ("chunk3", "chunk8", "spread3", "spread8", "gated3", "gated3n", "confirm3")
CHUNK = 8


def round_of(fn: Callable[[], object], round_ms: float) -> float:
    """One round: warm-up, then calls until `round_ms` is spent (5..100 calls); their median in ms."""
    start = time.perf_counter_ns()
    fn()
    first = (time.perf_counter_ns() - start) / 1e6
    calls = int(min(100, max(5, round_ms / max(first, 1e-3))))
    for _ in range(max(1, calls // 5)):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(samples)


class Sentinel:
    """A small fixed model timed for a few milliseconds: is the machine in its quick mode right now?

    The quick mode is the 10th percentile of the sentinel's recent timings (so that a drift of the
    quick mode itself over hours is followed); a check within `tolerance` of it passes.
    """

    def __init__(self, fn: Callable[[], object], tolerance: float) -> None:
        self.fn, self.tolerance = fn, tolerance
        self.recent: list[float] = []
        self.checks = self.waits = 0

    def ratio(self) -> float:
        self.checks += 1
        t = round_of(self.fn, 8.0)
        self.last = t
        self.recent = [*self.recent[-99:], t]
        if not hasattr(self, "reference"):
            self.reference = t
        return t / float(np.percentile(self.recent, 10))

    def quick(self) -> bool:
        return self.ratio() <= 1 + self.tolerance

    def wait_quick(self, max_s: float) -> None:
        """Poll until the machine is in its quick mode (at most `max_s`)."""
        deadline = time.perf_counter() + max_s
        while not self.quick() and time.perf_counter() < deadline:
            self.waits += 1


def gated_round(fn: Callable[[], object], sentinel: Sentinel, args: argparse.Namespace,
                normalise: bool = False) -> tuple[float, int]:
    """One round of `fn` that the sentinel saw quick just before and just after (or the last try); and the retries.

    With `normalise`, the time is scaled to the sentinel's speed at the start of the run: a drift of
    the quick mode itself (the machine a few per cent faster or slower for minutes) is taken out.
    """
    retries = 0
    while True:
        sentinel.wait_quick(args.max_wait)
        s0 = sentinel.last
        t = round_of(fn, args.round_ms)
        if sentinel.quick() or retries >= args.retries:
            if normalise:
                t *= sentinel.reference / (0.5 * (s0 + sentinel.last))
            return t, retries
        retries += 1


def run_schedule(name: str, items: list[Callable[[], object]], sentinel: Sentinel, args: argparse.Namespace
                 ) -> tuple[list[float], dict[str, Any]]:
    """Estimates (ms) of every item under schedule `name`, and what it cost."""
    started = time.perf_counter()
    rounds = int(name.rstrip("n")[-1])
    per_item: list[list[float]] = [[] for _ in items]
    redone = 0
    if name.startswith("confirm"):  # spread rounds until each item's two quickest agree within `confirm`
        todo = list(range(len(items)))
        for r in range(args.max_rounds):
            for i in todo:
                per_item[i].append(round_of(items[i], args.round_ms))
            if r + 1 >= rounds:
                todo = [i for i in todo if sorted(per_item[i])[1] > (1 + args.confirm) * min(per_item[i])]
                redone += len(todo)
            if not todo:
                break
    elif name.startswith("spread") or name.startswith("gated"):
        for _ in range(rounds):
            for i, fn in enumerate(items):
                if name.startswith("gated"):
                    t, again = gated_round(fn, sentinel, args, normalise=name.endswith("n"))
                    redone += again
                else:
                    t = round_of(fn, args.round_ms)
                per_item[i].append(t)
    else:
        for start in range(0, len(items), CHUNK):
            group = list(range(start, min(start + CHUNK, len(items))))
            for _ in range(rounds):
                for i in group:
                    per_item[i].append(round_of(items[i], args.round_ms))
    return [min(v) for v in per_item], {"seconds": time.perf_counter() - started, "redone_rounds": redone}


def subnets(n32: int, n224: int, tmp: Path) -> tuple[list[str], list[Callable[[], object]], Callable[[], object]]:
    """Random subnets of both spaces as ONNX Runtime sessions (1 thread), and the sentinel's call."""
    import torch

    from exporters.onnx import export_module, ort_session
    from hwnas import spaces
    from hwnas.blocks import build_network

    names, calls = [], []
    rng = np.random.default_rng(7)
    for space_name, n in (("mbv3-32", n32), ("mbv3-224", n224), ("mbv3-32", 1)):
        space = spaces.get(space_name)
        for _ in range(n):
            arch = space.sample(rng)
            torch.manual_seed(0)
            net = build_network(space.blocks(arch), space.se_ratio).eval()
            shape = space.input_shape(arch)
            path = export_module(net, tmp / f"{len(names)}.onnx", shape, batch_size=1, dynamic_batch=False)
            session = ort_session(path, threads=1)
            feed = {session.get_inputs()[0].name: rng.standard_normal((1, *shape)).astype(np.float32)}
            out = [o.name for o in session.get_outputs()]
            names.append(f"{space_name}:{arch.arch_id}")
            calls.append(lambda s=session, f=feed, o=out: s.run(o, f))
    return names[:-1], calls[:-1], calls[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--n32", type=int, default=16)
    parser.add_argument("--n224", type=int, default=8)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--round-ms", type=float, default=50.0)
    parser.add_argument("--tolerance", type=float, default=0.08)
    parser.add_argument("--retries", type=int, default=10)
    parser.add_argument("--max-wait", type=float, default=30.0, help="seconds a gated round waits for the quick mode")
    parser.add_argument("--confirm", type=float, default=0.02,
                        help="confirm schedules: the two quickest rounds of an item must agree this closely")
    parser.add_argument("--max-rounds", type=int, default=10, help="confirm schedules: at most this many rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/timing_schedule"))
    args = parser.parse_args()

    from hwnas.latency.device import describe, fingerprint
    from hwnas.latency.profiles import load_profile
    from hwnas.latency.quiet import reading, snapshot
    from hwnas.provenance import git_commit

    header = {"device": describe(fingerprint(load_profile("cpu-onnxruntime"))), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "args": {
                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    estimates: dict[str, list[list[float]]] = {s: [] for s in args.schedules}
    costs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.schedules}
    before = snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        names, items, sentinel_fn = subnets(args.n32, args.n224, Path(tmp))
        sentinel = Sentinel(sentinel_fn, args.tolerance)
        for _ in range(20):  # learn the quick mode before anything is timed
            sentinel.ratio()
        sentinel.reference = float(np.percentile(sentinel.recent, 10))
        for rep in range(args.reps):
            order = args.schedules[rep % len(args.schedules):] + args.schedules[:rep % len(args.schedules)]
            for name in order:
                values, cost = run_schedule(name, items, sentinel, args)
                estimates[name].append(values)
                costs[name].append(cost)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    after = snapshot()
    busy = reading(before, after, threads=1) if before and after else None
    header["busy_during"] = busy.to_dict() if busy else None

    every = np.array([estimates[s] for s in args.schedules])  # (schedule, rep, subnet)
    reference = np.percentile(every.reshape(-1, every.shape[-1]), 10, axis=0)
    summary = []
    for s in args.schedules:
        e = np.asarray(estimates[s])  # (rep, subnet)
        spread = e.max(axis=0) / e.min(axis=0) - 1
        off = np.abs(e / reference - 1)
        for label, cols in (("all", slice(None)), ("mbv3-32", slice(0, args.n32)), ("mbv3-224", slice(args.n32, None))):
            summary.append({
                "schedule": s, "subnets": label, "spread_median_pct": float(100 * np.median(spread[cols])),
                "spread_p90_pct": float(100 * np.percentile(spread[cols], 90)),
                "within_2pct_of_reference": float((off[:, cols] <= 0.02).mean()),
                "within_5pct_of_reference": float((off[:, cols] <= 0.05).mean()),
                "seconds_per_run": float(np.mean([c["seconds"] for c in costs[s]])),
                "redone_rounds_per_run": float(np.mean([c["redone_rounds"] for c in costs[s]]))})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimates.json").write_text(json.dumps({"subnets": names, "reference_ms": reference.tolist(),
                                                          "estimates_ms": estimates, "costs": costs}, indent=1) + "\n")
    (args.out / "summary.json").write_text(json.dumps({"header": header, "summary": summary}, indent=2) + "\n")
    lines = ["# Timing schedules on this machine, side by side", "",
             f"- machine: {header['device']}; load before {header['loadavg_before']}; over the run: "
             + (busy.describe() if busy else "no /proc/stat"),
             f"- commit {header['commit']}, {header['date']}; {args.reps} repetitions of each schedule, interleaved; "
             f"{args.n32} mbv3-32 and {args.n224} mbv3-224 random subnets; rounds of at most {args.round_ms:g} ms", "",
             "| schedule | subnets | spread over repetitions: median | p90 | within 2 % of reference | within 5 % "
             "| s per run | rounds redone |", "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['schedule']} | {r['subnets']} | {r['spread_median_pct']:.1f} % | "
                     f"{r['spread_p90_pct']:.1f} % | {100 * r['within_2pct_of_reference']:.0f} % | "
                     f"{100 * r['within_5pct_of_reference']:.0f} % | {r['seconds_per_run']:.1f} | "
                     f"{r['redone_rounds_per_run']:.1f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
