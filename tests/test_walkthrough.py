"""The README's "Walk-through: your data, your device", run as written on an RGB 4-class image folder.

The commands are read from README.md (the block after `<!-- walk-through -->`) and run in order through the real
`hwnas` main, in a fresh working directory, on a generated folder of 32 px PNGs: once with `train/` + `val/`, once
with `train/` alone. What is changed, and only this: `/data/parts` becomes the generated folder, `<device>` this
machine's name, `--epochs 40` one short epoch, `--n 200` and `--queries 300` a handful, the budget the middle of
the range the profile printed (on another CPU 0.3 ms may lie outside it), and profiling takes one timing round
and 4 calibration subnets with the quiet guard off (the suite is not a quiet machine). No other option is added.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"bolt": (220, 40, 40), "gear": (40, 200, 40), "nut": (40, 40, 220), "washer": (220, 220, 40)}


def readme_commands() -> list[list[str]]:
    """The `hwnas` commands of the walk-through block, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walk-through -->", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("hwnas "):
            commands.append(shlex.split(line)[1:])
    return commands


def write_parts(root: Path, splits: dict[str, int]) -> Path:
    """`root/<split>/<class>/<i>.png`: noisy solid colours, so a supernet learns something in one epoch."""
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def shortened(args: list[str], data: Path, device: str, budget: float | None) -> list[str]:
    """The README's command with the scale changes the module docstring lists, and nothing else."""
    swap = {"--epochs": "1", "--n": "3", "--queries": "4"}
    out = []
    for i, arg in enumerate(args):
        arg = arg.replace("/data/parts", str(data)).replace("<device>", device)
        if i and args[i - 1] in swap:
            arg = swap[args[i - 1]]
        if i and args[i - 1] == "--budget-ms" and budget is not None:
            arg = f"{budget:.4g}"
        out.append(arg)
    extra = {"profile": ["--rounds", "1", "--calibration-subnets", "4", "--allow-busy"],
             "latency": ["--rounds", "1", "--allow-busy", "--quiet"],
             "train": ["--steps-per-epoch", "2", "--bn-batches", "1", "--device", "cpu", "--quiet"],
             "search": ["--bn-batches", "1", "--quiet"], "export": ["--test-batches", "1"]}
    return out + extra.get(out[0], [])


def test_the_walkthrough_block_is_what_this_test_runs() -> None:
    commands = [c[0] if c[0] != "latency" else "latency " + c[1] for c in readme_commands()]
    assert commands == ["profile", "latency validate", "train", "search", "export"]


@pytest.mark.parametrize("layout", ["train+val", "train only"])
def test_the_readme_walkthrough_runs_as_written_on_an_rgb_folder(layout: str, tmp_path_factory: pytest.TempPathFactory,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 hwnas_cli: object) -> None:
    from hwnas.latency.device import device_slug, fingerprint
    from hwnas.latency.profiles import load_profile

    base = tmp_path_factory.getbasetemp() / "walkthrough"
    base.mkdir(exist_ok=True)
    data = write_parts(base / f"parts-{layout.replace(' ', '-').replace('+', '-')}",
                       {"train": 12, "val": 4} if layout == "train+val" else {"train": 14})
    work = base / f"work-{data.name}"
    work.mkdir()
    monkeypatch.chdir(work)
    shared = base / "latency_tables"  # one profile serves both layouts: the second run finds it complete
    if shared.is_dir():
        (work / "latency_tables").symlink_to(shared, target_is_directory=True)
    device = device_slug(fingerprint(load_profile("cpu-onnxruntime")))
    budget = None
    for args in readme_commands():
        argv = shortened(args, data, device, budget)
        result = hwnas_cli(*argv)  # type: ignore[operator]
        assert result.returncode == 0, f"hwnas {' '.join(argv)}\n{result.stderr}"
        if argv[0] == "profile":
            low, high = map(float, re.search(r"predicted latency range of mbv3-32[^:]*: ([\d.]+) \.\. ([\d.]+) ms",
                                              result.stdout + result.stderr).groups())
            budget = low + 0.5 * (high - low)
            if not shared.exists():
                (work / "latency_tables").rename(shared)
                (work / "latency_tables").symlink_to(shared, target_is_directory=True)
            else:
                assert "nothing measured, nothing written" in result.stdout, result.stdout
        if argv[0] == "train":
            said = result.stderr + result.stdout
            assert ("val/ is the test split" in said) == (layout == "train+val"), said
    table = work / "latency_tables" / "mbv3-32" / f"{device}__cpu-onnxruntime__in3-cls4.csv"
    assert table.is_file()
    exports = list((work / "exports" / "parts-0.3ms").glob("*.onnx"))
    assert exports, "the export wrote no ONNX file"
    import json

    import onnxruntime as ort

    report = json.loads((work / "exports" / "parts-0.3ms" / "deploy.json").read_text())
    meta = ort.InferenceSession(str(exports[0]), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert json.loads(meta.custom_metadata_map["hwnas.classes"]) == sorted(COLOURS)
    assert report["budget_ms"] == pytest.approx(budget, rel=1e-3) and report["measured_ms"] > 0
