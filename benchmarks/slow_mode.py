"""What slows a timed model on a shared machine: the other CPU busy, more runnable processes than CPUs, or the host?

The same ONNX Runtime models (1 intra-op thread, batch 1, as `cpu-onnxruntime` times them) and
two fixed-work probes are timed under five conditions, interleaved round by round so that the
host's own drift falls on every condition alike:

- `idle`: nothing else runs;
- `sibling-compute`: a process multiplying small matrices pinned to another CPU, the timed one to CPU 0;
- `sibling-memory`: a process streaming a 64 MB array pinned to another CPU (caches and memory bandwidth);
- `one-unpinned`: one busy process, neither pinned (the scheduler places both);
- `oversubscribed`: two busy processes, none pinned: more runnable processes than CPUs.

Each timing records the wall time and the thread's CPU time of every call (a call whose wall time
exceeds its CPU time was preempted), and the quiet guard's reading of /proc/stat over the timing
(`hwnas.latency.quiet`): the others' busy share and the hypervisor's steal. The probes tell the
causes apart: a compute probe in L1/L2 slows when the CPU itself runs slower (host contention,
frequency), a memory probe when the memory system is shared; a model that slows more than both
slows for a reason of its own. Nothing else may run while it does (it makes its own load).

    python benchmarks/slow_mode.py --rounds 8 --out benchmarks/results/slow_mode
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CONDITIONS = ("idle", "sibling-compute", "sibling-memory", "one-unpinned", "oversubscribed")
LOAD = {  # what a busy process runs, one thread of numpy
    "compute": "import numpy as np\na = np.random.rand(192, 192).astype(np.float32)\nwhile True:\n    a @ a\n",
    "memory": "import numpy as np\na = np.ones(16 << 20, np.float32)\nb = np.empty_like(a)\nwhile True:\n"
              "    np.copyto(b, a)\n",
}


def _child(kind: str, cpu: int | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = (f"import os\nos.sched_setaffinity(0, {{{cpu}}})\n" if cpu is not None else "") + LOAD[kind]
    return subprocess.Popen([sys.executable, "-c", code], env=env)


def start_load(condition: str, cpus: list[int]) -> list[subprocess.Popen[bytes]]:
    """The busy processes of `condition`; the timed process is pinned to cpus[0] where the condition pins."""
    others = cpus[1:]
    if condition == "idle":
        return []
    if condition in ("sibling-compute", "sibling-memory"):
        if not others:
            raise SystemExit("slow_mode: the sibling conditions need a second CPU")
        return [_child(condition.split("-")[1], others[0])]
    if condition == "one-unpinned":
        return [_child("compute", None)]
    return [_child("compute", None) for _ in range(len(cpus))]  # oversubscribed: one more runnable than CPUs


def stop_load(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        child.kill()
    for child in children:
        child.wait()


def pin(condition: str, cpus: list[int]) -> None:
    pinned = condition in ("sibling-compute", "sibling-memory", "idle")
    os.sched_setaffinity(0, {cpus[0]} if pinned else set(cpus))


def timed_calls(fn: Callable[[], object], warmup: int, calls: int) -> tuple[list[float], list[float]]:
    """(wall ms, thread CPU ms) of each of `calls` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(calls):
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        fn()
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        wall.append((w1 - w0) / 1e6)
        cpu.append((c1 - c0) / 1e6)
    return wall, cpu


def workloads(tmp: Path) -> dict[str, tuple[Callable[[], object], int, int]]:
    """name -> (one call, warm-up calls, timed calls): two subnets in ONNX Runtime and the two probes."""
    import torch

    from exporters.onnx import export_module, ort_session
    from hwnas import spaces
    from hwnas.blocks import build_network

    out: dict[str, tuple[Callable[[], object], int, int]] = {}
    for name, space_name, pick in (("mbv3-224 largest", "mbv3-224", "largest"),
                                   ("mbv3-32 middle", "mbv3-32", "middle")):
        space = spaces.get(space_name)
        arch = space.largest() if pick == "largest" else space.sample(np.random.default_rng(5))
        torch.manual_seed(0)
        net = build_network(space.blocks(arch), space.se_ratio).eval()
        shape = space.input_shape(arch)
        path = export_module(net, tmp / f"{space_name}.onnx", shape, batch_size=1, dynamic_batch=False)
        session = ort_session(path, threads=1)
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)}
        outputs = [o.name for o in session.get_outputs()]
        calls = 30 if space_name == "mbv3-224" else 300
        out[name] = ((lambda s=session, f=feed, o=outputs: s.run(o, f)), 5, calls)
    a = np.random.default_rng(1).random((96, 96), dtype=np.float32)
    out["compute probe"] = ((lambda: a @ a @ a), 20, 300)  # fits in L1/L2: the CPU's own speed
    big = np.ones(8 << 20, np.float32)
    dst = np.empty_like(big)
    out["memory probe"] = ((lambda: np.copyto(dst, big)), 2, 30)  # 32 MB each way: the memory system's
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, condition): median over rounds of the per-round median, spread over rounds, ratio to idle."""
    out = []
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["workload"], row["condition"]), []).append(row)
    for (workload, condition), items in sorted(by_key.items()):
        idle = {r["round"]: r["median_ms"] for r in by_key[(workload, "idle")]}
        ratios = [r["median_ms"] / idle[r["round"]] for r in items if r["round"] in idle]
        medians = [r["median_ms"] for r in items]
        out.append({
            "workload": workload, "condition": condition, "rounds": len(items),
            "median_ms": statistics.median(medians),
            "round_p10_ms": float(np.percentile(medians, 10)), "round_p90_ms": float(np.percentile(medians, 90)),
            "ratio_to_idle": statistics.median(ratios),
            "ratio_p10": float(np.percentile(ratios, 10)), "ratio_p90": float(np.percentile(ratios, 90)),
            "wall_over_cpu": statistics.median(r["wall_over_cpu"] for r in items),
            "preempted_share": statistics.median(r["preempted_share"] for r in items),
            "others_busy": statistics.median(r["others_busy"] for r in items),
            "steal": statistics.median(r["steal"] for r in items),
        })
    return out


def markdown(summary: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = ["# What slows a timed model on this machine", "",
             f"- machine: {header['device']}; {header['cpus']} CPUs; load before: {header['loadavg_before']}",
             f"- commit {header['commit']}, {header['date']}, {header['rounds']} interleaved rounds; nothing else "
             "ran (the benchmark makes its own load)", "",
             "| workload | condition | median ms | rounds p10-p90 | x idle (p10-p90) | wall/CPU | preempted calls "
             "| others busy | steal |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['workload']} | {s['condition']} | {s['median_ms']:.4g} | {s['round_p10_ms']:.4g}-"
                     f"{s['round_p90_ms']:.4g} | {s['ratio_to_idle']:.3f} ({s['ratio_p10']:.3f}-{s['ratio_p90']:.3f}) "
                     f"| {s['wall_over_cpu']:.3f} | {100 * s['preempted_share']:.0f} % | "
                     f"{100 * s['others_busy']:.0f} % | {100 * s['steal']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--settle", type=float, default=0.5, help="seconds between starting a load and timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/slow_mode"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    from hwnas.latency.device import describe, fingerprint
    from hwnas.latency.profiles import load_profile
    from hwnas.latency.quiet import reading, snapshot
    from hwnas.provenance import git_commit

    cpus = sorted(os.sched_getaffinity(0))
    header = {"device": describe(fingerprint(load_profile("cpu-onnxruntime"))), "cpus": len(cpus),
              "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
              "platform": platform.platform()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = workloads(Path(tmp))
        for r in range(args.rounds):
            order = args.conditions[r % len(args.conditions):] + args.conditions[:r % len(args.conditions)]
            for condition in order:
                pin(condition, cpus)
                children = start_load(condition, cpus)
                try:
                    time.sleep(args.settle if children else 0.05)
                    before = snapshot()  # one reading over all workloads: /proc/stat counts in 10 ms ticks
                    done = []
                    for name, (fn, warmup, calls) in work.items():
                        wall, cpu = timed_calls(fn, warmup, calls)
                        ratio = [w / max(c, 1e-9) for w, c in zip(wall, cpu, strict=True)]
                        done.append({"round": r, "condition": condition, "workload": name,
                                     "median_ms": statistics.median(wall), "min_ms": min(wall),
                                     "cpu_median_ms": statistics.median(cpu),
                                     "wall_over_cpu": statistics.median(ratio),
                                     "preempted_share": float(np.mean(np.asarray(ratio) > 1.2))})
                    after = snapshot()
                finally:
                    stop_load(children)
                busy = reading(before, after, threads=1) if before and after else None
                for row in done:
                    row.update(others_busy=busy.others if busy else float("nan"),
                               steal=busy.steal if busy else float("nan"))
                rows.extend(done)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    os.sched_setaffinity(0, set(cpus))
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "summary.json").write_text(json.dumps({"header": header, "summary": summary}, indent=2) + "\n")
    text = markdown(summary, header)
    (args.out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
