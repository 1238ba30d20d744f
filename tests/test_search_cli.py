"""`hwnas search` end to end: a supernet trained for a few steps, a synthetic table saved in LatencyTable's format.

Evaluations are cut to one validation batch and one BN batch, so a search of a dozen archs takes
seconds; what is checked (files, the hard budget, one-line errors, seeding) does not depend on it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

NEEDS = ("hwnas.latency.table", "hwnas.checkpoint", "hwnas.supernet", "hwnas.data", "hwnas.train", "hwnas.flops")
MISSING = [name for name in NEEDS if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"hwnas search end to end needs {', '.join(MISSING)}, "
                                                      "which is not written yet")

QUICK = ["--queries", "8", "--val-size", "200", "--val-batches", "1", "--batch-size", "50", "--bn-batches", "1",
         "--bn-batch-size", "32", "--device", "cpu", "--quiet"]


def small_fashion_mnist(directory: Path, n_train: int = 800, n_test: int = 200) -> Path:
    """The first images of Debian's Fashion-MNIST as a directory of raw idx files: loads in milliseconds."""
    from hwnas.data import FASHION_MNIST_DIR, IDX_FILES, read_idx

    directory.mkdir(parents=True, exist_ok=True)
    for key, (stem, ndim) in IDX_FILES.items():
        array = read_idx(FASHION_MNIST_DIR / f"{stem}.gz", ndim)[: n_train if key.startswith("train") else n_test]
        header = bytes([0, 0, 0x08, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        (directory / stem).write_bytes(header + array.tobytes())
    return directory


@dataclasses.dataclass
class Setup:
    supernet: Path
    table: Path
    low: float
    high: float

    def args(self, budget: float, out: Path, *extra: str) -> list[str]:
        return ["search", "--supernet", str(self.supernet), "--table", str(self.table), "--budget-ms", f"{budget}",
                "--out", str(out), *QUICK, *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from test_search import synthetic_table

    from hwnas import spaces
    from hwnas.data import load_dataset
    from hwnas.train import TrainConfig, train_supernet

    root = tmp_path_factory.mktemp("search_cli")
    space = spaces.get("mbv3-32")
    # the checkpoint records this spec, and 'hwnas search' reads the same data back from it
    dataset = load_dataset(f"fashion-mnist:{small_fashion_mnist(root / 'fmnist')}", val_size=200)
    config = TrainConfig(epochs=1, batch_size=16, steps_per_epoch=3, num_sampled=1, lr=0.05, warmup_epochs=0.0,
                         bn_batches=1, eval_batch_size=64, val_batches=1, device="cpu", collapse_drop=None)
    checkpoint = train_supernet(space, dataset, config, root / "run", progress=False)
    table = synthetic_table(space)
    path = table.save(root / "latency_tables" / "mbv3-32" / "synthetic__test.csv")
    low, high = table.latency_range(space)
    return Setup(checkpoint, path, low, high)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from hwnas.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_evolution_end_to_end_writes_the_files_and_prints_the_best(setup: Setup, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from hwnas.latency.table import LatencyTable
    from hwnas.space import Arch

    budget = setup.low + 0.4 * (setup.high - setup.low)
    out = tmp_path / "evo"
    code, printed, err = run_cli(setup.args(budget, out, "--strategy", "evolution", "--population", "4"), capsys)
    assert code == 0, err
    for name in ("candidates.csv", "pareto.csv", "pareto.png", "best.json", "summary.md", "history.csv"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((out / "best.json").read_text())
    arch = Arch.from_file(out / "best.json")  # what 'hwnas export --arch best.json' reads
    table = LatencyTable.load(setup.table)
    assert best["predicted_latency_ms"] == pytest.approx(table.predict(arch)) and table.predict(arch) <= budget
    assert best["budget_ms"] == budget and best["strategy"] == "evolution" and 0 <= best["accuracy"] <= 100
    assert best["accuracy_metric"] == "accuracy" and best["flops"] > 0 and best["supernet_evaluations"] == 8
    candidates = pd.read_csv(out / "candidates.csv")
    assert len(candidates) == 8 and candidates["feasible"].all() and (candidates["latency_ms"] <= budget).all()
    assert best["accuracy"] == candidates["accuracy"].max()
    history = pd.read_csv(out / "history.csv")
    assert {"mean_accuracy", "std_accuracy", "best_accuracy"} <= set(history.columns) and len(history) >= 2
    assert f"budget: {budget:g} ms" in (out / "summary.md").read_text()
    assert f"best arch {arch.arch_id}" in printed and arch.to_json().replace(", ", "") in printed.replace(", ", "")
    assert "predicted latency" in printed and "validation accuracy" in printed
    assert str(out / "best.json") in printed and str(out / "summary.md") in printed
    # a second run into the same directory is refused rather than mixed with the first
    code, _, err = run_cli(setup.args(budget, out), capsys)
    assert code == 2 and "--force" in one_line(err)


def test_infeasible_budget_is_one_line_with_the_range_before_any_evaluation(setup: Setup, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    code, _, err = run_cli(setup.args(0.5 * setup.low, tmp_path / "none"), capsys)
    elapsed = time.perf_counter() - start
    assert code == 2
    line = one_line(err)
    assert "mbv3-32" in line and f"{setup.low:.4g}-{setup.high:.4g} ms" in line and "exact" in line
    assert not (tmp_path / "none").exists() and elapsed < 10  # no data loaded, nothing evaluated


def test_seed_from_transfers_a_front_and_refuses_another_space(setup: Setup, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from hwnas import spaces

    first = tmp_path / "first"
    code, _, err = run_cli(setup.args(setup.high, first, "--strategy", "nsga", "--population", "4"), capsys)
    assert code == 0, err
    front = pd.read_csv(first / "pareto.csv")
    budget = setup.low + 0.6 * (setup.high - setup.low)
    second = tmp_path / "second"
    code, _, err = run_cli(setup.args(budget, second, "--seed-from", str(first), "--population", "4"), capsys)
    assert code == 0, err
    candidates = pd.read_csv(second / "candidates.csv")
    seeded = set(front.loc[front["latency_ms"] <= budget, "arch_id"])
    assert seeded and seeded <= set(candidates.loc[candidates["generation"] == 0, "arch_id"])
    assert "seeded_from" in json.loads((second / "best.json").read_text())

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    arch = spaces.get("mbv3-224").smallest()
    pd.DataFrame({"arch_id": [arch.arch_id], "latency_ms": [1.0], "accuracy": [50.0], "arch": [arch.to_json()]}
                 ).to_csv(foreign / "pareto.csv", index=False)
    code, _, err = run_cli(setup.args(budget, tmp_path / "x", "--seed-from", str(foreign)), capsys)
    assert code == 2
    line = one_line(err)
    assert "space 'mbv3-224'" in line and "'mbv3-32'" in line and str(foreign) in line


def test_predictor_fits_on_supernet_scores_and_the_supernet_confirms(setup: Setup, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    budget = setup.low + 0.5 * (setup.high - setup.low)
    code, printed, err = run_cli(setup.args(budget, out, "--predictor", "--predictor-kind", "ridge", "--strategy",
                                            "evolution", "--predictor-queries", "300", "--confirm", "3",
                                            "--queries", "10"), capsys)
    assert code == 0, err
    assert "ridge predictor: Kendall tau" in printed
    best = json.loads((out / "best.json").read_text())
    assert best["accuracy_metric"] == "confirmed_accuracy" and best["supernet_evaluations"] <= 10
    candidates = pd.read_csv(out / "candidates.csv")
    assert len(candidates) == 300 and candidates["confirmed_accuracy"].notna().sum() >= 3
    assert best["accuracy"] == candidates.loc[candidates["feasible"], "confirmed_accuracy"].max()
    assert best["predicted_latency_ms"] <= budget


def test_a_table_of_another_space_spec_is_refused(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_search import synthetic_table

    from hwnas import spaces

    rgb = synthetic_table(spaces.get("mbv3-32", in_channels=3)).save(tmp_path / "rgb.csv")
    args = ["search", "--supernet", str(setup.supernet), "--table", str(rgb), "--budget-ms", "5", "--out",
            str(tmp_path / "x"), *QUICK]
    code, _, err = run_cli(args, capsys)
    # a table of another shape cannot serve even with --allow-mismatch (stem and head differ): the advice is the
    # profile command that builds the right one
    assert code == 2 and "in_channels" in one_line(err) and "hwnas profile" in err and \
        "--in-channels 1 --num-classes 10" in err  # the shape of the supernet searched
    code, _, err = run_cli([*args[:-len(QUICK)], "--strategy", "annealing", *QUICK], capsys)
    assert code == 2 and "unknown search strategy 'annealing'" in one_line(err)


def test_help_shows_an_example(capsys: pytest.CaptureFixture) -> None:
    from hwnas.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["search", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--seed-from" in text and "--budget-ms" in text


def test_drift_correct_and_measure_top_time_real_subnets_on_this_device(setup: Setup, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """A table claiming this CPU (synthetic numbers, real profile and fingerprint): the drift check and the
    final pick time real ONNX Runtime sessions, and best.json records both."""
    from test_search import synthetic_table

    from hwnas import spaces
    from hwnas.latency.backends import Timing
    from hwnas.latency.device import device_slug, fingerprint
    from hwnas.latency.profiler import calibration_path
    from hwnas.latency.profiles import load_profile
    from hwnas.latency.table import LatencyTable
    from hwnas.space import Arch

    space = spaces.get("mbv3-32")
    profile = load_profile("cpu-onnxruntime")
    fp = fingerprint(profile)
    here = LatencyTable.new(space, profile=profile, fingerprint=fp, device_slug=device_slug(fp))
    synthetic = synthetic_table(space)
    for spec in space.all_blocks():  # the same synthetic block times, now claimed for this device
        t = synthetic.block_cost(spec)
        here.record(spec, Timing(median_ms=t, p10_ms=t, p90_ms=t, mean_ms=t, n=1))
    path = here.save(tmp_path / "here__cpu-onnxruntime.csv")
    archs = [space.sample(np.random.default_rng(i)) for i in range(2)]  # 2: the check's time is theirs
    pd.DataFrame({"arch_id": [a.arch_id for a in archs], "arch": [a.to_json() for a in archs],
                  "median_ms": here.predict_many(archs)}).to_csv(calibration_path(path), index=False)

    out = tmp_path / "measured"
    budget = 20 * setup.high  # feasible whatever the drift factor turns out to be
    args = ["search", "--supernet", str(setup.supernet), "--table", str(path), "--budget-ms", f"{budget}",
            "--out", str(out), *QUICK, "--drift", "correct", "--measure-top", "2"]
    code, printed, err = run_cli(args, capsys)
    assert code == 0, err
    assert "2 calibration subnets re-timed" in printed and "timed the top 2 in-budget candidates" in printed
    best = json.loads((out / "best.json").read_text())
    factor = best["latency_drift"]["factor"]  # real ONNX Runtime vs synthetic milliseconds: far from 1
    assert abs(factor - 1) > 0.05 and "predictions scaled by" in printed
    arch = Arch.from_file(out / "best.json")
    assert best["predicted_latency_ms"] == pytest.approx(factor * here.predict(arch))
    picked = best["measured_pick"]
    assert picked["timed"] == 2 and picked["met_budget"] and picked["picked_rank"] == 0 and picked["measured_ms"] > 0
    assert pd.read_csv(out / "candidates.csv")["measured_ms"].notna().sum() == 2
    # the export predicts as the search did: the table scaled by the drift recorded in best.json
    code, printed, err = run_cli(["export", "--supernet", str(setup.supernet), "--arch", str(out / "best.json"),
                                  "--data", "none", "--out", str(tmp_path / "export")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "export" / "deploy.json").read_text())
    assert report["predicted_ms"] == pytest.approx(best["predicted_latency_ms"]) and "prediction scaled by" in printed
    assert report["table_drift"] == pytest.approx(factor)
    # timed over a budget nothing meets: the warning says how fast the device runs the table's subnets now
    code, printed, err = run_cli(["export", "--supernet", str(setup.supernet), "--arch", str(out / "best.json"),
                                  "--data", "none", "--profile", "cpu-onnxruntime", "--budget-ms", "1e-6",
                                  "--out", str(tmp_path / "over")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "over" / "deploy.json").read_text())
    assert report["measured_ms"] > 1e-6 and report["drift_when_over"] > 0
    assert any("OVER the budget" in w and "calibration subnets at" in w for w in report["warnings"])

    # the synthetic table of setup records no profile: nothing to time it with, said in one line
    code, _, err = run_cli(setup.args(budget, tmp_path / "none", "--measure-top", "2"), capsys)
    assert code == 2 and "records no profile" in one_line(err)


def test_margin_searches_under_a_guard_band_and_keeps_the_budget_for_the_export(setup: Setup, tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture) -> None:
    budget = setup.low + 0.5 * (setup.high - setup.low)
    out = tmp_path / "guarded"
    code, printed, err = run_cli(setup.args(budget, out, "--margin", "0.2"), capsys)
    assert code == 0, err
    best = json.loads((out / "best.json").read_text())
    assert best["budget_ms"] == budget and best["search_budget_ms"] == pytest.approx(0.8 * budget)
    assert best["predicted_latency_ms"] <= 0.8 * budget and "margin 0.2" in printed
    assert (pd.read_csv(out / "candidates.csv")["latency_ms"] <= 0.8 * budget).all()
    code, _, err = run_cli(setup.args(budget, tmp_path / "bad", "--margin", "0.5"), capsys)
    assert code == 2 and "--margin is a fraction of the budget in [0, 0.5)" in one_line(err)


def test_a_table_takes_budgets_of_its_own(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--table T.csv:A,B` without --budget-ms: one search per own budget; the records name their files relative to
    themselves; an own budget no subnet meets is refused naming the table, before any evaluation."""
    from hwnas.fileio import resolve_recorded

    lo, hi = setup.low + 0.4 * (setup.high - setup.low), setup.low + 0.8 * (setup.high - setup.low)
    out = tmp_path / "own"
    args = ["search", "--supernet", str(setup.supernet), "--table", f"{setup.table}:{lo:.4f},{hi:.4f}",
            "--out", str(out), *QUICK]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    family = json.loads((out / "family.json").read_text())
    assert sorted(e["budget_ms"] for e in family) == [round(lo, 4), round(hi, 4)]
    for entry in family:
        best = json.loads((out / entry["dir"] / "best.json").read_text())
        assert best["predicted_latency_ms"] <= entry["budget_ms"]
        for name in ("supernet", "table"):
            assert not Path(best[name]).is_absolute()
            assert resolve_recorded(best[name], out / entry["dir"]).resolve() == \
                Path(getattr(setup, name)).resolve()
    code, _, err = run_cli(["search", "--supernet", str(setup.supernet), "--table", f"{setup.table}:{lo:.4f}",
                            f"{setup.table}:{setup.low / 10:.5f}", "--out", str(tmp_path / "no"), *QUICK], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"table {setup.table}" in lines[0] and "span" in lines[0], err
    assert not (tmp_path / "no").exists()
