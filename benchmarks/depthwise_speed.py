"""How much does `hwnas.depthwise` speed up training? torch's depthwise conv against ours, in one run.

Four levels, the two ways interleaved and the median of `--repeats` kept, so that a busy
neighbour slows both alike; the first three time forward + backward:

1. the depthwise convs of mbv3-32's largest and smallest subnets at their feature-map sizes;
2. one supernet training step's work (largest, two random subnets, smallest: the sandwich rule);
3. one step of the largest subnet trained alone (`train_standalone`, through `fast_depthwise`);
4. and, as a check that nothing got slower, the supernet's forward without gradients (evaluation).

    python benchmarks/depthwise_speed.py --out benchmarks/results/depthwise_speed
    python benchmarks/depthwise_speed.py --device cuda --batch 512      # on a GPU: only the tap crop applies
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hwnas import spaces
from hwnas.blocks import build_network
from hwnas.depthwise import depthwise_conv2d, fast_depthwise
from hwnas.latency.device import cpu_model
from hwnas.provenance import git_commit
from hwnas.space import Arch, SearchSpace
from hwnas.supernet import ops
from hwnas.supernet.model import Supernet


def torch_depthwise(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    return F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])


@contextlib.contextmanager
def supernet_depthwise(conv: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Make the supernet's dynamic depthwise convs call `conv` (the baseline: torch's own)."""
    original = ops.depthwise_conv2d
    ops.depthwise_conv2d = conv  # type: ignore[assignment]
    try:
        yield
    finally:
        ops.depthwise_conv2d = original  # type: ignore[assignment]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(ways: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each way, timed in turns after one untimed call each."""
    for run in ways.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, run in ways.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def depthwise_shapes(space: SearchSpace, archs: list[Arch]) -> list[tuple[int, int, int, int]]:
    """(channels, side, kernel, stride) of every distinct depthwise conv the archs run."""
    shapes = []
    for arch in archs:
        for spec in space.blocks(arch):
            if spec.kind == "mbconv":
                shape = (spec.hidden, spec.in_size, spec.kernel, spec.stride)
                if shape not in shapes:
                    shapes.append(shape)
    return shapes


def _conv_step(conv: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
               stride: int) -> Callable[[], None]:
    def run() -> None:
        conv(x, weight, stride).sum().backward()
    return run


def op_level(space: SearchSpace, batch: int, repeats: int, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for channels, side, kernel, stride in depthwise_shapes(space, [space.largest(), space.smallest()]):
        x = torch.randn(batch, channels, side, side, device=device).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(channels, 1, kernel, kernel, device=device)
        t = interleaved({name: _conv_step(conv, x.requires_grad_(True), weight.requires_grad_(True), stride)
                         for name, conv in (("torch", torch_depthwise), ("hwnas", depthwise_conv2d))},
                        repeats, device)
        rows.append({"channels": channels, "side": side, "kernel": kernel, "stride": stride,
                     "torch_ms": 1e3 * t["torch"], "hwnas_ms": 1e3 * t["hwnas"], "speedup": t["torch"] / t["hwnas"]})
    return rows


def supernet_step(space: SearchSpace, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    net = Supernet(space).to(device).to(memory_format=torch.channels_last).train()
    rng = np.random.default_rng(0)
    archs = [space.largest(), space.sample(rng), space.sample(rng), space.smallest()]
    side = max(space.resolution_choices)
    x = torch.randn(batch, space.in_channels, side, side, device=device)
    y = torch.randint(0, space.num_classes, (batch,), device=device)
    inputs = {a.resolution: F.interpolate(x, size=a.resolution, mode="bilinear", antialias=True)
              .contiguous(memory_format=torch.channels_last) for a in archs}

    def step() -> None:
        net.zero_grad(set_to_none=True)
        for arch in archs:
            F.cross_entropy(net.set_active(arch)(inputs[arch.resolution]), y).backward()

    def baseline() -> None:
        with supernet_depthwise(torch_depthwise):
            step()

    t = interleaved({"torch": baseline, "hwnas": step}, repeats, device)
    return {"torch_s": t["torch"], "hwnas_s": t["hwnas"], "speedup": t["torch"] / t["hwnas"],
            "torch_img_s": batch / t["torch"], "hwnas_img_s": batch / t["hwnas"]}


def supernet_eval(space: SearchSpace, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Forward only, no gradient (validation, search): here torch's own kernels should be kept."""
    torch.manual_seed(0)
    net = Supernet(space).to(device).to(memory_format=torch.channels_last).eval()
    archs = [space.largest(), space.smallest()]
    inputs = {a.resolution: torch.randn(batch, space.in_channels, a.resolution, a.resolution, device=device)
              .contiguous(memory_format=torch.channels_last) for a in archs}

    def forward() -> None:
        with torch.no_grad():
            for arch in archs:
                net.set_active(arch)(inputs[arch.resolution])

    def baseline() -> None:
        with supernet_depthwise(torch_depthwise):
            forward()

    t = interleaved({"torch": baseline, "hwnas": forward}, repeats, device)
    return {"torch_s": t["torch"], "hwnas_s": t["hwnas"], "speedup": t["torch"] / t["hwnas"]}


def standalone_step(space: SearchSpace, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    arch = space.largest()
    net = build_network(space.blocks(arch), space.se_ratio).to(device).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, space.in_channels, arch.resolution, arch.resolution,
                    device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, space.num_classes, (batch,), device=device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    def fast() -> None:
        with fast_depthwise(net):
            step()

    t = interleaved({"torch": step, "hwnas": fast}, repeats, device)
    return {"torch_s": t["torch"], "hwnas_s": t["hwnas"], "speedup": t["torch"] / t["hwnas"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256, help="images per step (default: %(default)s)")
    parser.add_argument("--op-batch", type=int, default=128, help="images per conv at the op level")
    parser.add_argument("--eval-batch", type=int, default=500, help="images per forward at level 4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write summary.json and summary.md here")
    args = parser.parse_args(argv)
    if min(args.batch, args.op_batch, args.eval_batch, args.repeats) < 1:
        parser.error("--batch, --op-batch, --eval-batch and --repeats must be at least 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device!r}: this benchmark runs on 'cpu' or an available 'cuda' device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    space = spaces.get("mbv3-32")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{cpu_model()}, {os.cpu_count()} cores")
    header = (f"device: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"commit {(git_commit() or 'unknown')[:7]}; median of {args.repeats}, the two ways interleaved")
    lines = [header, "", f"1. depthwise conv, forward + backward, batch {args.op_batch}, channels-last", "",
             "| channels | side | kernel | stride | torch ms | hwnas ms | speed-up |", "|---|---|---|---|---|---|---|"]
    print(header)
    ops_rows = op_level(space, args.op_batch, args.repeats, device)
    lines += [f"| {r['channels']} | {r['side']} | {r['kernel']} | {r['stride']} | {r['torch_ms']:.2f} | "
              f"{r['hwnas_ms']:.2f} | {r['speedup']:.2f}x |" for r in ops_rows]
    supernet = supernet_step(space, args.batch, args.repeats, device)
    standalone = standalone_step(space, args.batch, args.repeats, device)
    evaluation = supernet_eval(space, args.eval_batch, args.repeats, device)
    lines += ["", f"2. supernet step (largest, 2 random, smallest), batch {args.batch}: torch "
              f"{supernet['torch_s']:.3f} s, hwnas {supernet['hwnas_s']:.3f} s: {supernet['speedup']:.2f}x",
              f"3. largest subnet alone, one step, batch {args.batch}: torch {standalone['torch_s']:.3f} s, "
              f"hwnas {standalone['hwnas_s']:.3f} s: {standalone['speedup']:.2f}x",
              f"4. supernet forward without gradients (largest and smallest), batch {args.eval_batch}: torch "
              f"{evaluation['torch_s']:.3f} s, hwnas {evaluation['hwnas_s']:.3f} s: {evaluation['speedup']:.2f}x"]
    print("\n".join(lines[1:]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.md").write_text("\n".join(lines) + "\n")
        (args.out / "summary.json").write_text(json.dumps(
            {"device": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "commit": git_commit(), "batch": args.batch, "op_batch": args.op_batch, "repeats": args.repeats,
             "eval_batch": args.eval_batch, "ops": ops_rows, "supernet_step": supernet, "standalone_step": standalone,
             "supernet_eval": evaluation}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
