"""A user's own small RGB folder of N classes: it trains with the defaults, its splits are said, bad folders fail.

The folders are generated here (4 classes of 32x32 PNGs, a few images each); every training run is one step of
a tiny batch, so the file runs in seconds per test.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hwnas.checkpoint import load_checkpoint
from hwnas.commands.train import val_size_arg
from hwnas.data import load_dataset
from hwnas.data.readers import SplitNotice, default_val_count
from hwnas.errors import DataError

COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 40), "star": (40, 40, 220), "triangle": (220, 220, 40)}
TINY = ("--epochs", "1", "--num-sampled", "0", "--bn-batches", "1", "--device", "cpu", "--quiet")


def write_folder(root: Path, counts: dict[str, int], classes: dict[str, tuple[int, int, int]] = COLOURS) -> Path:
    """`root/<split>/<class>/<i>.png`: 32x32 noisy solid colours, `counts[split]` images per class."""
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        for name, colour in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def spec(root: Path) -> str:
    return f"imagefolder:{root}?size=32"


def test_own_rgb_folder_trains_with_the_default_val_size_and_batch(tmp_path: Path, hwnas_cli) -> None:
    """README's command on 4 classes x 10 training images and a val/ folder: the default --val-size (5000) and
    --batch-size (512) both exceed the data; they fit it and say so, and val/ is said to be the test split."""
    data = write_folder(tmp_path / "parts", {"train": 10, "val": 5})
    out = tmp_path / "runs" / "x"
    command = ("train", "--space", "mbv3-32", "--data", spec(data), "--out", str(out), *TINY)
    result = hwnas_cli(*command)
    assert result.returncode == 0, result.stderr
    assert (f"data {spec(data)}: 36 training, 4 validation (--val-size default: 5000 or 10 % of the training images, "
            "whichever is smaller), 20 test images") in result.stdout
    notes = [line for line in result.stderr.splitlines() if "val/ is the test split" in line]
    assert notes == [f"hwnas train: warning: imagefolder {data}: no test/ folder: val/ is the test split "
                     "(20 images); validation is 4 images held out of train/"]
    assert ("hwnas train: warning: --batch-size 512 is larger than the 36 training images: training with batches "
            "of 36 (one step per epoch)") in result.stderr.splitlines()
    state = load_checkpoint(out / "supernet.pt")
    assert state["train_config"]["batch_size"] == 36 and state["val_size"] == 4 and state["epoch"] == 1
    assert state["history"][0]["val_acc_largest"] >= 0.0
    again = hwnas_cli(*command, "--resume")  # the same command resumes: the fitted batch and split agree
    assert again.returncode == 0, again.stderr


def test_train_help_text(capsys: pytest.CaptureFixture) -> None:
    from hwnas.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "imagefolder:DIR[?size=N&crop=F]" in text and "default 224" in text and "'imagefolder:DIR?size=32'" in text
    assert "DIR/val only: DIR/val is the TEST split; validation is --val-size images held out of DIR/train" in text
    assert "a count N >= 1 or a fraction 0 < F < 1 (default: 5000 or 10 % of the training images" in text


def test_val_size_is_a_count_or_a_fraction_and_every_error_advises_a_value_the_cli_takes(tmp_path: Path) -> None:
    assert (val_size_arg("8"), val_size_arg("0.25"), val_size_arg("1e2"), val_size_arg("3.0")) == (8, 0.25, 100, 3)
    for bad in ("0", "1.5", "-3", "x", "nan", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="a count of images .* or a fraction in \\(0, 1\\)"):
            val_size_arg(bad)
    data = write_folder(tmp_path / "d", {"train": 10, "val": 2})
    with pytest.warns(SplitNotice):
        assert len(load_dataset(spec(data), val_size=8).val) == 8
        assert len(load_dataset(spec(data), val_size=0.25).val) == 10
        assert len(load_dataset(spec(data)).val) == default_val_count(40) == 4
    for too_many, advice in ((40, r"such as (\d+) or a fraction such as (0\.1)"),
                             (0.001, r"a larger fraction or a count such as (\d+)"),
                             (1.0, r"a count such as (\d+) or a fraction such as (0\.1)")):
        with pytest.raises(DataError, match=advice) as refused:
            load_dataset(spec(data), val_size=too_many)
        assert str(data / "train") in str(refused.value)
        for value in re.search(advice, str(refused.value)).groups():  # type: ignore[union-attr]
            accepted = val_size_arg(value)  # the CLI takes the advice ...
            with pytest.warns(SplitNotice):
                load_dataset(spec(data), val_size=accepted)  # ... and the library loads with it


def test_a_train_only_folder_carves_test_and_validation_seeded_and_disjoint(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "d", {"train": 10})
    with pytest.warns(SplitNotice, match=rf"imagefolder {data}: no val/ or test/ folder: the test split is 4 "
                                         r"images and validation 4 images, both held out of train/ \(seeded"):
        first = load_dataset(spec(data))
    with pytest.warns(SplitNotice):
        again, other_seed = load_dataset(spec(data)), load_dataset(spec(data), seed=1)
    assert (len(first.train), len(first.val), len(first.test)) == (32, 4, 4)
    splits = [set(first.train.paths), set(first.val.paths), set(first.test.paths)]  # type: ignore[attr-defined]
    assert sum(map(len, splits)) == len(set().union(*splits)) == 40  # disjoint, and every image in one
    assert [s.paths for s in (again.train, again.val, again.test)] == \
        [s.paths for s in (first.train, first.val, first.test)]  # type: ignore[attr-defined]
    assert other_seed.test.paths == first.test.paths  # type: ignore[attr-defined]  # test does not move with the seed
    assert other_seed.val.paths != first.val.paths  # type: ignore[attr-defined]
    assert torch.bincount(first.train.labels, minlength=4).min() > 0
    write_folder(tmp_path / "few", {"train": 1}, {k: COLOURS[k] for k in ("circle", "square")})
    with pytest.raises(DataError, match=r"few/train: 2 images cannot give a test and a validation split of 1 each"):
        load_dataset(spec(tmp_path / "few"))


def _degenerate(root: Path, case: str) -> tuple[str, str]:
    """A bad folder, and the one line it is refused with (a regex)."""
    if case == "one class":
        write_folder(root, {"train": 4, "val": 2}, {"circle": COLOURS["circle"]})
        return spec(root), rf"{root / 'train'}: one class folder only \('circle'\): a classifier needs at least two"
    if case == "empty class folder":
        write_folder(root, {"train": 4, "val": 2})
        for image in (root / "train" / "star").iterdir():
            image.unlink()
        return spec(root), rf"{root / 'train' / 'star'}: no images \(expected .*remove the empty class folder"
    if case == "class only in val":
        write_folder(root, {"train": 4, "val": 2})
        write_folder(root, {"val": 2}, {"hexagon": (90, 90, 90)})
        return spec(root), (rf"{root / 'val'}: class folder\(s\) hexagon not in {root / 'train'} \(its classes: "
                            rf"circle, square, star, triangle\): a class needs training images; add "
                            rf"{root / 'train' / 'hexagon'} or remove {root / 'val' / 'hexagon'}")
    if case == "class lost to validation":
        write_folder(root, {"train": 1, "val": 1}, {k: COLOURS[k] for k in ("circle", "square")})
        return spec(root), rf"{root / 'train'}/\w+: every image of class '\w+' went to the held-out splits"
    assert case == "validation larger than train"
    write_folder(root, {"train": 10, "val": 2})
    return spec(root), rf"{root / 'train'}: val_size 40 must be in \[1, 39\]"


@pytest.mark.parametrize("case", ["one class", "empty class folder", "class only in val", "class lost to validation",
                                  "validation larger than train"])
def test_degenerate_folders_are_refused_in_one_line_naming_the_folder(tmp_path: Path, hwnas_cli, case: str) -> None:
    data, message = _degenerate(tmp_path / "d", case)
    out = tmp_path / "runs" / "x"
    extra = ("--val-size", "40") if case == "validation larger than train" else ()
    result = hwnas_cli("train", "--space", "mbv3-32", "--data", data, "--out", str(out), *extra, *TINY)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("hwnas train: error: "), result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.stderr and not out.exists()  # refused before anything was written
