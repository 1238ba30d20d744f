"""Are subnets cut from a trained supernet as good as the same networks trained alone?

For a supernet checkpoint, on the test split (after BN re-estimation on training batches):
accuracy of the largest, the smallest and N random subnets. Then, for K archs spread over the
FLOPs range (smallest, middle, largest when K = 3), the same arch trained from scratch as a
standalone network with the checkpoint's own recipe and epochs (plain CE with label smoothing):
inherited minus from-scratch accuracy, goal >= -0.5 points. With K >= 3, the Kendall tau between
the supernet's ranking (validation split, as a search would see it) and the stand-alone ranking.

    python benchmarks/supernet_quality.py --checkpoint runs/fmnist/supernet.pt --out bench/quality
    torchrun --standalone --nproc_per_node 8 benchmarks/supernet_quality.py \\
        --checkpoint runs/fmnist/supernet.pt --out bench/quality --scratch-archs 8 --device cuda

Under torchrun the stand-alone trainings are dealt out over the ranks (several processes share
one GPU well: a small network leaves it idle most of the time, waiting for Python); rank 0
evaluates the supernet and writes the summary. Each finished stand-alone training is kept in
OUT/scratch/<arch_id>.json, so a killed run continues where it stopped. Everything lands in OUT:
subnets.csv, scratch.csv, summary.json and summary.md.

The stand-alone trainings need only the recipe, not the trained supernet, so on a machine with
room to spare they can start beside `hwnas train`: `--scratch-only --recipe RUN/train_config.json`
trains them with that run's recipe (the checkpoint only names the space) and stops; the full
benchmark on RUN/supernet.pt later finds them done.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch.distributed as tdist

from hwnas.checkpoint import load_supernet
from hwnas.data import Dataset, load_dataset
from hwnas.errors import HwnasError
from hwnas.evaluation import evaluate, resolve_device, subnet_accuracy
from hwnas.fileio import atomic_write_text
from hwnas.flops import arch_flops
from hwnas.recipe import TrainConfig
from hwnas.sampling import UniformSampler
from hwnas.space import Arch, SearchSpace
from hwnas.standalone import saved_progress, train_standalone

GOAL_LARGEST, GOAL_SMALLEST, GOAL_GAP = 93.5, 91.0, -0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="supernet checkpoint (hwnas train's OUT/supernet.pt)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--data", help="dataset spec (default: the one the checkpoint was trained on)")
    parser.add_argument("--val-size", type=int, default=5000,
                        help="validation images held out of training: the supernet's own (hwnas train --val-size; "
                             "default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--random", type=int, default=10, help="random subnets besides the largest and smallest")
    parser.add_argument("--scratch-archs", type=int, default=None,
                        help="archs trained from scratch (default: 8 on CUDA, 3 on CPU; 0: none)")
    parser.add_argument("--scratch-epochs", type=int, default=None,
                        help="epochs of the stand-alone trainings (default: the checkpoint's; fewer makes the "
                             "comparison unfair to the stand-alone networks, and the report says so)")
    parser.add_argument("--bn-batches", type=int, default=None,
                        help="training batches for BN re-estimation (default: the checkpoint's bn_batches)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the random subnets")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="a run's train_config.json: the stand-alone recipe (default: the checkpoint's)")
    parser.add_argument("--scratch-only", action="store_true",
                        help="train the stand-alone archs, then stop (no evaluation of the supernet)")
    args = parser.parse_args(argv)
    if args.random < 0:
        parser.error(f"--random must be >= 0, got {args.random}")
    if args.scratch_archs is not None and not 0 <= args.scratch_archs <= args.random + 2:
        parser.error(f"--scratch-archs must lie in 0..{args.random + 2} (largest, smallest and the --random "
                     f"{args.random}), got {args.scratch_archs}")
    for name in ("scratch_epochs", "bn_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _base_spec(spec: str) -> str:
    """'fashion-mnist (train subset 2048, seed 0)' -> 'fashion-mnist': the loadable part of a recorded spec."""
    return spec.split(" (", 1)[0]


def read_recipe(path: Path, space: SearchSpace) -> dict[str, Any]:
    """A run's train_config.json (`hwnas train` writes it before the first step), checked against `space`."""
    try:
        recipe = json.loads(path.read_text())
    except FileNotFoundError:
        raise HwnasError(f"{path}: no such recipe file") from None
    except (OSError, ValueError) as exc:
        raise HwnasError(f"{path}: not a readable train_config.json ({exc})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("train_config"), dict):
        raise HwnasError(f"{path}: field 'train_config' is missing")
    if recipe.get("space") != space.name:
        raise HwnasError(f"{path}: field 'space' is {recipe.get('space')!r}, the checkpoint's space is {space.name!r}")
    return recipe


def pick_archs(space: SearchSpace, n_random: int, seed: int) -> list[tuple[str, Arch]]:
    sampler = UniformSampler(space, seed)
    archs = [("largest", space.largest()), ("smallest", space.smallest())]
    seen = {a for _, a in archs}
    while len(archs) < n_random + 2:
        arch = sampler.sample()
        if arch not in seen:
            seen.add(arch)
            archs.append((f"random{len(archs) - 2}", arch))
    return archs


def scratch_choice(space: SearchSpace, archs: list[tuple[str, Arch]], k: int) -> list[tuple[str, Arch]]:
    """Smallest, largest and k - 2 of the random ones spread evenly over their FLOPs order ('middle' for k = 3)."""
    if k <= 0:
        return []
    ends = [a for a in archs if a[0] in ("smallest", "largest")]
    rest = sorted((a for a in archs if a[0] not in ("smallest", "largest")), key=lambda a: arch_flops(space, a[1]))
    inner = k - len(ends)
    if inner <= 0:
        return ends[:k]
    positions = np.linspace(0, len(rest) - 1, inner + 2)[1:-1] if inner < len(rest) else np.arange(len(rest))
    chosen = [rest[int(round(p))] for p in positions]
    if k == 3 and chosen:
        chosen = [("middle:" + chosen[0][0], chosen[0][1])]
    return [ends[1], *chosen, ends[0]]  # smallest first


def _init_torchrun() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    # gloo only coordinates (a barrier); the work itself is single-process per rank, any device.
    tdist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    return tdist.get_rank(), tdist.get_world_size()


def scratch_result(space: SearchSpace, name: str, arch: Arch, dataset: Dataset, config: TrainConfig,
                   out: Path, log: str | None = None) -> dict[str, Any]:
    """Train `arch` alone (or read the result of an earlier run) and score it on validation and test."""
    path = out / "scratch" / f"{arch.arch_id}.json"
    recipe = config.to_dict()
    if path.exists():
        cached = json.loads(path.read_text())
        # the device is where a recipe ran, not part of it: a GPU run's results count on a CPU re-run
        if {**cached.get("config", {}), "device": None} == {**recipe, "device": None}:
            if log is not None:
                print(f"{log}{name} ({arch.arch_id}): stand-alone result of an earlier run ({path})", flush=True)
            return cached
    if log is not None:
        print(f"{log}training {name} ({arch.arch_id}) from scratch for {config.epochs} epochs", flush=True)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    config = dataclasses.replace(config, device=str(device))
    state = path.with_suffix(".state.pt")  # saved every epoch: a killed run continues from its last epoch
    earlier = saved_progress(state) if state.exists() else None
    if log is not None and earlier is not None:
        print(f"{log}{name} ({arch.arch_id}): continuing from epoch {earlier[0]} ({state})", flush=True)
    start = time.perf_counter()
    model = train_standalone(space, arch, dataset, config, state_path=state)
    seconds = time.perf_counter() - start + (earlier[1] if earlier is not None else 0.0)
    scores = {}
    for split_name, split in (("val", dataset.val), ("test", dataset.test)):
        correct, total = evaluate(model, split, arch.resolution, device=device, batch_size=config.eval_batch_size)
        scores[split_name] = 100.0 * correct / total
    result = {"name": name, "arch_id": arch.arch_id, "arch": arch.to_dict(), "config": recipe,
              "scratch_val": scores["val"], "scratch_test": scores["test"], "train_seconds": seconds}
    atomic_write_text(path, json.dumps(result, indent=2))
    state.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = _init_torchrun()
    try:
        return run(args, rank, world)
    except HwnasError as exc:
        print(f"supernet_quality: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world: int) -> int:
    supernet, state = load_supernet(args.checkpoint)
    space = supernet.space
    source = read_recipe(args.recipe, space) if args.recipe else state
    recipe = TrainConfig.from_dict(source["train_config"])
    spec = args.data or _base_spec(str(source.get("dataset") or "fashion-mnist"))
    dataset = load_dataset(spec, val_size=args.val_size, seed=0)
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    bn_batches = args.bn_batches or recipe.bn_batches
    default_k = min(8 if device.type == "cuda" else 3, args.random + 2)
    k = args.scratch_archs if args.scratch_archs is not None else default_k
    archs = pick_archs(space, args.random, args.seed)
    scratch_archs = scratch_choice(space, archs, k)
    scratch_config = dataclasses.replace(recipe, device=args.device, epochs=args.scratch_epochs or recipe.epochs)
    args.out.mkdir(parents=True, exist_ok=True)

    # -- stand-alone trainings, dealt out over the ranks ----------------------------------------------
    for index, (name, arch) in enumerate(scratch_archs):
        if index % world == rank:
            scratch_result(space, name, arch, dataset, scratch_config, args.out, log=f"[rank {rank}] ")
    if world > 1:
        tdist.barrier()
    if rank != 0:
        return 0
    if args.scratch_only:
        print(f"stand-alone results of {len(scratch_archs)} archs in {args.out / 'scratch'}")
        return 0

    # -- inherited weights ------------------------------------------------------------------------------
    supernet = supernet.to(device)
    rows = []
    start = time.perf_counter()
    for name, arch in archs:
        row: dict[str, Any] = {"name": name, "arch_id": arch.arch_id, "resolution": arch.resolution,
                               "mflops": arch_flops(space, arch) / 1e6}
        for split_name, split in (("val", dataset.val), ("test", dataset.test)):
            row[f"inherited_{split_name}"] = subnet_accuracy(
                supernet, arch, split, dataset.train, device=device, bn_batches=bn_batches,
                bn_batch_size=recipe.batch_size, batch_size=recipe.eval_batch_size, seed=recipe.seed)
        row["arch"] = arch.to_json()
        rows.append(row)
    eval_seconds = time.perf_counter() - start
    subnets = pd.DataFrame(rows)
    subnets.to_csv(args.out / "subnets.csv", index=False, float_format="%.4f")

    scratch = pd.DataFrame([scratch_result(space, n, a, dataset, scratch_config, args.out)
                            for n, a in scratch_archs])
    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "dataset": spec, "space": space.name, "device": str(device),
        "bn_batches": bn_batches, "bn_batch_size": recipe.batch_size, "supernet_epochs": recipe.epochs,
        "scratch_epochs": scratch_config.epochs, "eval_seconds": eval_seconds,
        "largest_test": float(subnets.loc[subnets.name == "largest", "inherited_test"].iloc[0]),
        "smallest_test": float(subnets.loc[subnets.name == "smallest", "inherited_test"].iloc[0]),
    }
    if args.random:
        summary["random_test_mean"] = float(subnets.loc[subnets.name.str.startswith("random"), "inherited_test"].mean())
    if len(scratch):
        scratch = scratch.drop(columns=["config", "arch"]).merge(
            subnets[["arch_id", "mflops", "resolution", "inherited_val", "inherited_test"]], on="arch_id")
        scratch["gap_test"] = scratch["inherited_test"] - scratch["scratch_test"]
        scratch.to_csv(args.out / "scratch.csv", index=False, float_format="%.4f")
        summary["worst_gap"] = float(scratch["gap_test"].min())
        summary["mean_gap"] = float(scratch["gap_test"].mean())
        if len(scratch) >= 3:
            from scipy.stats import kendalltau

            tau = kendalltau(scratch["inherited_val"], scratch["scratch_test"])
            if np.isfinite(tau.statistic):  # undefined when one ranking is all ties
                summary["kendall_tau"] = float(tau.statistic)
                summary["kendall_p"] = float(tau.pvalue)
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    report = render(subnets, scratch, summary)
    atomic_write_text(args.out / "summary.md", report)
    print(report)
    print(f"wrote {args.out / 'subnets.csv'}, {args.out / 'scratch.csv'}, {args.out / 'summary.json'} "
          f"and {args.out / 'summary.md'}")
    return 0


def _check(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _epochs_note(summary: dict[str, Any]) -> str:
    scratch, supernet = summary["scratch_epochs"], summary["supernet_epochs"]
    if scratch < supernet:
        return f"{scratch} epochs, FEWER than the supernet's {supernet}: unfair to the stand-alone networks"
    if scratch > supernet:
        return f"{scratch} epochs, MORE than the supernet's {supernet}: unfair to the supernet"
    return f"{scratch} epochs, as the supernet"


def render(subnets: pd.DataFrame, scratch: pd.DataFrame, summary: dict[str, Any]) -> str:
    lines = [f"# Supernet quality: {summary['checkpoint']}", "",
             f"{summary['space']} on {summary['dataset']} (test split); BN re-estimated on "
             f"{summary['bn_batches']} training batches of {summary['bn_batch_size']} images per subnet.", "",
             "| subnet | res | MFLOPs | val % | test % |", "|---|---:|---:|---:|---:|"]
    for row in subnets.itertuples():
        lines.append(f"| {row.name} ({row.arch_id}) | {row.resolution} | {row.mflops:.1f} | "
                     f"{row.inherited_val:.2f} | {row.inherited_test:.2f} |")
    lines += ["", f"- largest: {summary['largest_test']:.2f} % (goal >= {GOAL_LARGEST}: "
                  f"{_check(summary['largest_test'] >= GOAL_LARGEST)})",
              f"- smallest: {summary['smallest_test']:.2f} % (goal >= {GOAL_SMALLEST}: "
              f"{_check(summary['smallest_test'] >= GOAL_SMALLEST)})"]
    if "random_test_mean" in summary:
        lines.append(f"- random subnets: mean {summary['random_test_mean']:.2f} %")
    if len(scratch):
        lines += ["", f"## Inherited vs trained from scratch ({_epochs_note(summary)})", "",
                  "| subnet | MFLOPs | inherited test % | scratch test % | inherited - scratch | scratch s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in scratch.itertuples():
            lines.append(f"| {row.name} ({row.arch_id}) | {row.mflops:.1f} | {row.inherited_test:.2f} | "
                         f"{row.scratch_test:.2f} | {row.gap_test:+.2f} | {row.train_seconds:.0f} |")
        lines += ["", f"- worst gap {summary['worst_gap']:+.2f} points, mean {summary['mean_gap']:+.2f} "
                      f"(goal >= {GOAL_GAP}: {_check(summary['worst_gap'] >= GOAL_GAP)})"]
        if "kendall_tau" in summary:
            lines.append(f"- Kendall tau, supernet (validation) vs stand-alone (test) ranking of {len(scratch)} "
                         f"archs: {summary['kendall_tau']:.3f} (p = {summary['kendall_p']:.3g})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
