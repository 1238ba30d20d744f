"""benchmarks/supernet_quality.py: arguments that cannot give the comparison are refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
from _benchmarks import load_benchmark

from hwnas import spaces

bench = load_benchmark("supernet_quality")


@pytest.mark.parametrize("extra, message", [
    (["--random", "-1"], "--random must be >= 0, got -1"),
    (["--random", "2", "--scratch-archs", "5"], "--scratch-archs must lie in 0..4"),
    (["--scratch-archs", "-1"], "--scratch-archs must lie in 0..12"),
    (["--scratch-epochs", "0"], "--scratch-epochs must be >= 1, got 0"),
    (["--bn-batches", "0"], "--bn-batches must be >= 1, got 0"),
])
def test_bad_arguments_are_refused_in_one_line(extra: list[str], message: str,
                                                capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--checkpoint", "c.pt", "--out", "o", *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_scratch_archs_span_the_flops_range_smallest_first_largest_last() -> None:
    space = spaces.get("mbv3-32")
    archs = bench.pick_archs(space, 10, seed=2024)
    assert len({a for _, a in archs}) == 12
    eight = bench.scratch_choice(space, archs, 8)
    flops = [bench.arch_flops(space, a) for _, a in eight]
    assert [n for n, _ in eight][0] == "smallest" and eight[-1][0] == "largest"
    assert len({a for _, a in eight}) == 8 and flops[1:-1] == sorted(flops[1:-1])
    three = bench.scratch_choice(space, archs, 3)
    assert [n.split(":")[0] for n, _ in three] == ["smallest", "middle", "largest"]


@pytest.mark.parametrize("scratch, words", [(5, "FEWER"), (10, "as the supernet"), (30, "MORE")])
def test_the_report_says_when_the_epochs_differ(scratch: int, words: str) -> None:
    assert words in bench._epochs_note({"scratch_epochs": scratch, "supernet_epochs": 10})


def test_scratch_only_trains_with_a_runs_recipe_and_a_rerun_reuses_the_results(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    import json

    from hwnas.recipe import TrainConfig
    from tests.test_data import write_fashion_dir

    write_fashion_dir(tmp_path / "fm", gz=True, n_train=60, n_test=20)
    recipe = TrainConfig(epochs=1, batch_size=8, steps_per_epoch=1, num_sampled=0, warmup_epochs=0.0, device="cpu")
    recipe_file = tmp_path / "train_config.json"
    recipe_file.write_text(json.dumps({"space": "mbv3-32", "dataset": "fashion-mnist",
                                       "train_config": recipe.to_dict()}))
    argv = ["--checkpoint", str(Path(bench.__file__).parent.parent / "hwnas/checkpoints/mbv3-32_fashion-mnist.pt"),
            "--out", str(tmp_path / "q"), "--data", f"fashion-mnist:{tmp_path / 'fm'}", "--device", "cpu",
            "--val-size", "20", "--random", "1", "--scratch-archs", "3", "--scratch-only", "--recipe", str(recipe_file)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "q" / "scratch").glob("*.json"))]
    assert len(results) == 3 and "stand-alone results of 3 archs" in printed
    assert all(r["config"] == recipe.to_dict() for r in results)  # the run's recipe, not the checkpoint's
    assert not list((tmp_path / "q" / "scratch").glob("*.state.pt"))  # each state went once its result was kept
    assert not (tmp_path / "q" / "summary.md").exists()  # the supernet was not evaluated
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count("stand-alone result of an earlier run") == 3

    recipe_file.write_text(json.dumps({"space": "mbv3-224", "train_config": recipe.to_dict()}))
    assert bench.main(argv) == 2
    assert "field 'space' is 'mbv3-224', the checkpoint's space is 'mbv3-32'" in capsys.readouterr().err
