"""The same subnets exported from Once-for-All's supernet and from hwnas after `hwnas import ofa`, side by side.

OFA's side is what an OFA user does: `set_active_subnet`, `get_active_subnet()`, then a plain
`torch.onnx.export` (opset 17, TorchScript exporter, constant folding, static batch 1). hwnas's
side is `import_ofa` of the same state dict, `Supernet.extract` and hwnas's exporter
(`exporters.onnx.export_onnx`: onnx.checker, ONNX Runtime parity, onnxslim where parity holds), as
`hwnas export` writes it. The supernet is OFA's MobileNetV3 (w1.0 by default) built by the `ofa`
package with random weights (He-initialised, BN statistics estimated on random images, so that
outputs are of order one and the parity figures mean something): node counts and latency do not
depend on the weights, and no download is needed (pass `--checkpoint` to use a published file instead).

For each arch (the smallest, the largest, then random ones, seed 0): ONNX node counts, file size,
parameters, the largest difference of each file's ONNX Runtime output from OFA's torch output, and
the latency of both files in ONNX Runtime under the `cpu-onnxruntime` profile (CPU provider, fp32,
batch 1, 1 intra-op thread). All 2 x N files are timed in one interleaved run
(`hwnas.latency.profiler.time_interleaved`: round-robin passes, at least `--rounds`, more until each
file's two quickest rounds agree, the quickest round kept) under the quiet guard, whose readings
are kept with the results, beside the commit, date, device, load and library versions.

    python benchmarks/ofa_export.py --out benchmarks/results/ofa_export           # the real run: a quiet machine
    python benchmarks/ofa_export.py --archs 2 --rounds 1 --repeats 5 --warmup 1 --busy ignore --max-wait 0 \
        --out /tmp/ofa_export                                                     # a dry run: proves it runs

Timing: run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from hwnas import spaces
from hwnas.arch import Arch
from hwnas.latency.backends import OnnxRuntimeCpuBackend, Timing
from hwnas.latency.device import device_slug, fingerprint, library_versions
from hwnas.latency.profiler import time_interleaved
from hwnas.latency.profiles import load_profile
from hwnas.latency.quiet import QuietGuard
from hwnas.ofa_import import ofa_subnet_settings
from hwnas.provenance import git_commit
from hwnas.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
OFA_KWARGS: dict[str, Any] = {"ks_list": [3, 5, 7], "expand_ratio_list": [3, 4, 6], "depth_list": [2, 3, 4]}


def bench_archs(space: SearchSpace, n: int) -> list[Arch]:
    rng = np.random.default_rng(0)
    archs = [space.smallest(), space.largest()]
    while len(archs) < n:
        arch = space.sample(rng)
        if arch not in archs:
            archs.append(arch)
    return archs[:n]


def nontrivial(ofa: Any, seed: int = 0) -> None:
    """Random weights whose outputs are of order one (the package's initial ones pool to ~1e-9 logits, which
    would make any parity figure pass): He-initialised convs, residual branches' last BN scale 0.3, BN
    statistics estimated on random images."""
    from torch import nn

    torch.manual_seed(seed)
    for module in ofa.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in")
    bns = [m for m in ofa.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average
    with torch.no_grad():
        for block in ofa.blocks[1:]:  # residual branches start small, as in training, or the sums grow
            if block.shortcut is not None:
                block.conv.point_linear.bn.bn.weight.fill_(0.3)
    ofa.set_max_net()
    ofa.train()
    with torch.no_grad():
        ofa(torch.randn(8, 3, 160, 160, generator=torch.Generator().manual_seed(seed)))
    for bn in bns:
        bn.momentum = 0.1
    ofa.eval()


def onnx_figures(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(ops.items())), "bytes": path.stat().st_size,
            "initializer_values": params}


def ort_output(path: Path, x: torch.Tensor) -> np.ndarray:
    from exporters.onnx import ort_session

    session = ort_session(path, threads=1)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


class FileTimer:
    """`time_interleaved`'s backend protocol over ONNX files: one round of one file, in ONNX Runtime."""

    def __init__(self, backend: OnnxRuntimeCpuBackend) -> None:
        self.backend = backend

    def time_module(self, path: Path, shape: tuple[int, int, int]) -> Timing:
        return self.backend.time_onnx(path, shape)


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, default=10, help="subnets (default: %(default)s)")
    parser.add_argument("--width", choices=("1.0", "1.2"), default="1.0", help="OFA's width (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a published OFA state dict instead of random weights (its width is read off it)")
    parser.add_argument("--profile", default="cpu-onnxruntime", help="device profile (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds at least (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="calls per round (default: the profile's)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per round (default: the profile's)")
    parser.add_argument("--busy", choices=("warn", "refuse", "ignore"), default="warn",
                        help="a busy machine: warn (default), refuse, or only record it")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="seconds to wait for a quiet machine before timing (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ofa_export")
    args = parser.parse_args()
    try:
        from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3
    except ImportError:
        print("ofa_export: needs Once-for-All's package: pip install ofa (hwnas's extra [ofa])", file=sys.stderr)
        return 2
    from exporters.onnx import export_onnx
    from hwnas.ofa_import import OFA_PRESETS, import_ofa, read_ofa_state_dict

    profile = load_profile(args.profile)
    profile = dataclasses.replace(profile, repeats=args.repeats or profile.repeats,
                                  warmup=profile.warmup if args.warmup is None else args.warmup)
    if profile.backend != "onnxruntime-cpu":
        print(f"ofa_export: profile {profile.name} is not an ONNX Runtime CPU profile", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ofa-export-") as tmp_name:
        tmp = Path(tmp_name)
        if args.checkpoint is not None:
            state = read_ofa_state_dict(args.checkpoint)
            width = "1.2" if state["first_conv.conv.weight"].shape[0] == spaces.get("mbv3-224-w1.2").stem_channels \
                else "1.0"
            source = args.checkpoint
        else:
            width, source = args.width, tmp / f"ofa_mbv3_d234_e346_k357_w{args.width}"
        torch.manual_seed(0)
        ofa = OFAMobileNetV3(n_classes=1000, dropout_rate=0.0, width_mult=float(width), **OFA_KWARGS)
        if args.checkpoint is not None:
            ofa.load_state_dict(state)
        else:
            nontrivial(ofa)
            torch.save(ofa.state_dict(), source)
        ofa.eval()
        imported = import_ofa(source, tmp / "supernet.pt")
        from hwnas.checkpoint import load_supernet

        supernet, _ = load_supernet(imported.out)
        space = supernet.space
        assert space.name == OFA_PRESETS[width]
        rows: list[dict[str, Any]] = []
        items: list[tuple[Path, tuple[int, int, int]]] = []
        for n, arch in enumerate(bench_archs(space, args.archs)):
            shape = (3, arch.resolution, arch.resolution)
            x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(n))
            ofa.set_active_subnet(**ofa_subnet_settings(space, arch))
            ofa_subnet = ofa.get_active_subnet(preserve_weight=True).eval()
            with torch.no_grad():
                reference = ofa_subnet(x).numpy()
            ofa_path = tmp / "onnx" / f"{arch.arch_id}.ofa.onnx"  # not kept: 10-20 MB each
            hwnas_path = tmp / "onnx" / f"{arch.arch_id}.hwnas.onnx"
            ofa_path.parent.mkdir(parents=True, exist_ok=True)
            with torch.no_grad():
                torch.onnx.export(ofa_subnet, (x,), str(ofa_path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["logits"])
            export_onnx(supernet.extract(arch), arch, hwnas_path, input_shape=shape)
            row: dict[str, Any] = {"arch_id": arch.arch_id, "arch": arch.to_dict(), "resolution": arch.resolution,
                                   "params": int(sum(p.numel() for p in ofa_subnet.parameters())),
                                   "flops": int(space.flops_params(arch)[0]),
                                   "ofa_torch_max_abs_logit": float(np.abs(reference).max())}
            for who, path in (("ofa", ofa_path), ("hwnas", hwnas_path)):
                row[who] = {**onnx_figures(path), "file": path.name,
                            "ort_vs_ofa_torch_max_abs_diff": float(np.abs(ort_output(path, x) - reference).max())}
            rows.append(row)
            items += [(ofa_path, shape), (hwnas_path, shape)]
            print(f"{arch.arch_id}: {row['ofa']['nodes']} vs {row['hwnas']['nodes']} nodes", file=sys.stderr)
        guard = QuietGuard(policy=args.busy, threads=profile.threads, max_wait_s=args.max_wait,
                           log=lambda line: print(line, file=sys.stderr))
        load_before = _loadavg()
        timings = time_interleaved(FileTimer(OnnxRuntimeCpuBackend(profile)), items, args.rounds,
                                   profile.statistic, guard=guard, what="ofa_export")
        load_after = _loadavg()
    for i, row in enumerate(rows):
        for who, timing in (("ofa", timings[2 * i]), ("hwnas", timings[2 * i + 1])):
            row[who]["latency"] = timing.to_dict()
            row[who]["ms"] = timing.value(profile.statistic)
        row["node_ratio"] = row["ofa"]["nodes"] / row["hwnas"]["nodes"]
        row["speedup"] = row["ofa"]["ms"] / row["hwnas"]["ms"]
    fp = fingerprint(profile)
    header = {"commit": git_commit(), "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "device": device_slug(fp), "cpu": fp.get("cpu_model"), "python": platform.python_version(),
              "libraries": library_versions(), "ofa_version": imported.source.get("ofa_package_here"),
              "supernet": "random weights (ofa package)" if args.checkpoint is None else str(args.checkpoint),
              "width": width, "space": space.name, "profile": dataclasses.asdict(profile) | {"path": None},
              "rounds_at_least": args.rounds, "loadavg_before": load_before, "loadavg_after": load_after,
              "quiet": {"readings": guard.readings, "warnings": guard.warnings, "waited_s": guard.waited_s}}
    (args.out / "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2, default=str) + "\n")
    slower = [r["arch_id"] for r in rows if r["hwnas"]["ms"] > r["ofa"]["ms"]]
    busy = [float(r["others_busy"]) for r in guard.readings if r.get("others_busy") is not None]
    lines = [f"# The same subnets exported from OFA's supernet and from hwnas after `hwnas import ofa` ({space.name})",
             "",
             f"- commit {(header['commit'] or 'unknown')[:7]}, {header['date']}, {header['device']} "
             f"({header['cpu']}), ofa {header['ofa_version']}, torch {header['libraries'].get('torch')}, "
             f"onnxruntime {header['libraries'].get('onnxruntime')}",
             "- OFA: `get_active_subnet()` + plain `torch.onnx.export` (opset 17); hwnas: `import_ofa` + "
             "`Supernet.extract` + `exporters.onnx.export_onnx`; weights: " + header["supernet"],
             f"- latency: profile {profile.name} (ONNX Runtime CPU, batch {profile.batch_size}, {profile.threads} "
             f"thread(s), {profile.statistic} of {profile.repeats} calls per round), all {len(items)} files in one "
             f"interleaved run, at least {args.rounds} rounds, the quickest kept",
             f"- load average before / after: {load_before} / {load_after}; other CPUs busy while timing: "
             + (f"max {100 * max(busy):.0f} %" if busy else "not read"),
             f"- hwnas's file slower than OFA's: {len(slower)} of {len(rows)}" + (f" ({', '.join(slower)})"
                                                                                  if slower else ""),
             "",
             "| arch | res | params | nodes OFA / hwnas | OFA ms | hwnas ms | OFA / hwnas | max diff vs OFA torch "
             "(OFA file, hwnas file; max logit) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch_id']} | {r['resolution']} | {r['params'] / 1e6:.2f} M | {r['ofa']['nodes']} / "
                     f"{r['hwnas']['nodes']} ({r['node_ratio']:.2f}x) | {r['ofa']['ms']:.3f} | {r['hwnas']['ms']:.3f} "
                     f"| {r['speedup']:.2f}x | {r['ofa']['ort_vs_ofa_torch_max_abs_diff']:.1e}, "
                     f"{r['hwnas']['ort_vs_ofa_torch_max_abs_diff']:.1e}; {r['ofa_torch_max_abs_logit']:.2g} |")
    text = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
