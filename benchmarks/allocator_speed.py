"""Does the memory allocator matter for training on a CPU? glibc's malloc against tcmalloc and jemalloc.

A supernet step on a CPU allocates and frees activation buffers of tens of megabytes, a few
hundred times a step. glibc hands blocks that large back to the kernel when they are freed, so
the next step faults every page in again (the child reports its minor page faults, which show
it). tcmalloc and jemalloc keep freed memory for reuse. The allocator is chosen when a process
starts (`LD_PRELOAD`), so each way runs in a child process of its own: the rounds interleave the
ways, every child times `--steps` sandwich steps (largest, two random, smallest, with in-place
distillation and an SGD step) after one untimed, and the median over rounds is kept.

    python benchmarks/allocator_speed.py --threads 2 --out benchmarks/results/allocator_speed
    LD_PRELOAD=libtcmalloc_minimal.so.4 hwnas train ...     # what a user does with the answer

Allocators that are not installed are left out, and the report says so (Debian:
libtcmalloc-minimal4, libjemalloc2).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ALLOCATORS = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}


def find_allocators() -> dict[str, str | None]:
    """Each allocator's shared library as the dynamic linker finds it, or None where it is not installed."""
    return {"glibc": None, **{name: ctypes.util.find_library(lib) for name, lib in ALLOCATORS.items()}}


def loaded_allocators() -> list[str]:
    """The allocators whose library this process has mapped: proof that LD_PRELOAD took effect."""
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return sorted(name for name, lib in ALLOCATORS.items() if f"lib{lib}" in maps)


def time_steps(batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """In this process: seconds of each of `steps` sandwich steps after an untimed one, and the page faults."""
    from hwnas import spaces
    from hwnas.recipe import TrainConfig, kd_loss, make_optimizer
    from hwnas.supernet import Supernet

    space = spaces.get("mbv3-32")
    torch.manual_seed(seed)
    net = Supernet(space).to(memory_format=torch.channels_last).train()
    optimizer = make_optimizer(net, TrainConfig())
    rng = np.random.default_rng(seed)
    archs = [space.largest(), space.sample(rng), space.sample(rng), space.smallest()]
    side = max(space.resolution_choices)
    x = torch.randn(batch, space.in_channels, side, side)
    y = torch.randint(0, space.num_classes, (batch,))
    inputs = {a.resolution: F.interpolate(x, size=a.resolution, mode="bilinear", antialias=True)
              .contiguous(memory_format=torch.channels_last) for a in archs}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = net.set_active(archs[0])(inputs[archs[0].resolution])
        F.cross_entropy(logits, y, label_smoothing=0.1).backward()
        teacher = logits.detach()
        for arch in archs[1:]:
            kd_loss(net.set_active(arch)(inputs[arch.resolution]), teacher).backward()
        optimizer.step()

    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"seconds": seconds, "faults_per_step": faults / steps, "threads": torch.get_num_threads(),
            "loaded": loaded_allocators()}


def run_child(name: str, library: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """One child process under allocator `name`; refused unless the child really runs with it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("LD_PRELOAD", None)
    if library is not None:
        env["LD_PRELOAD"] = library
    command = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--steps", str(args.steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"allocator_speed: the child with LD_PRELOAD={library} failed:\n{done.stderr[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [] if library is None else [name]
    if child["loaded"] != expected:
        raise SystemExit(f"allocator_speed: the child meant for {name} ran with {child['loaded'] or 'glibc'}")
    return child


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="images per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="children per allocator, interleaved")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of the children")
    parser.add_argument("--allocators", default=",".join(["glibc", *ALLOCATORS]),
                        help="comma-separated, glibc first as the baseline (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write summary.json and summary.md here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.rounds, args.threads) < 1:
        parser.error("--batch, --steps, --rounds and --threads must be at least 1")
    args.allocators = args.allocators.split(",")
    known = ["glibc", *ALLOCATORS]
    if args.allocators[0] != "glibc" or not set(args.allocators) <= set(known):
        parser.error(f"--allocators: a comma-separated list of {', '.join(known)}, glibc first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(time_steps(args.batch, args.steps)))
        return 0
    from hwnas.latency.device import cpu_model
    from hwnas.provenance import git_commit

    found = find_allocators()
    ways = {name: found[name] for name in args.allocators if name == "glibc" or found[name] is not None}
    missing = sorted(set(args.allocators) - set(ways))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, library in ways.items():
            runs[name].append(run_child(name, library, args))
    rows = []
    for name, children in runs.items():
        step = statistics.median(statistics.median(c["seconds"]) for c in children)
        faults = statistics.median(c["faults_per_step"] for c in children)
        rows.append({"allocator": name, "library": ways[name], "step_s": step, "images_per_s": args.batch / step,
                     "faults_per_step": faults})
    base = rows[0]["step_s"]
    for row in rows:
        row["speedup_vs_glibc"] = base / row["step_s"]
    device, commit = cpu_model(), git_commit()
    header = (f"device: {device}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} thread(s); "
              f"commit {(commit or 'unknown')[:7]}; batch {args.batch}; median of {args.rounds} child "
              f"processes per allocator (interleaved), each the median of {args.steps} steps")
    lines = [header, "", "| allocator | step s | images/s | minor page faults / step | vs glibc |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['allocator']} | {r['step_s']:.3f} | {r['images_per_s']:.0f} | {r['faults_per_step']:.0f} | "
              f"{r['speedup_vs_glibc']:.2f}x |" for r in rows]
    if missing:
        lines += ["", f"not installed, left out: {', '.join(missing)}"]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text("\n".join(lines) + "\n")
        (args.out / "summary.json").write_text(json.dumps(
            {"device": device, "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
             "commit": commit, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
             "rows": rows, "missing": missing, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
