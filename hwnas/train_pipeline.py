"""`run_training`: everything `hwnas train` does, as one library call: the data by its spec, the space fitted to
its channels and classes, a supernet trained on it with the sandwich rule (`hwnas.train.train_supernet`).

Under torchrun every rank calls it; rank 0 writes the files and `TrainOutcome.main` says which
rank this is, so a caller prints once.

A user's own small folder must train with the defaults: the validation split defaults to 5000 or
10 % of the training images, whichever is smaller, and a batch larger than the training split is
cut to the split's size. Both are said in one line each, since they decide what the numbers
printed later mean.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwnas.data.readers import DEFAULT_VAL_FRACTION, DEFAULT_VAL_SIZE
from hwnas.errors import DataError
from hwnas.fileio import check_output_dir
from hwnas.recipe import TrainConfig

if TYPE_CHECKING:
    from hwnas.data import Dataset

Log = Callable[[str], None]


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _stdout(message: str) -> None:
    print(message, flush=True)


@dataclass
class TrainRequest:
    """What to train: a space preset by name, the dataset spec it learns, the recipe, and where the run goes."""

    space: str
    out: Path
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: str = "fashion-mnist"
    # training images held out as the validation split: a count, a fraction in (0, 1), or None for 5000 or 10 %
    # of the training images, whichever is smaller (`hwnas.data.readers.default_val_count`)
    val_size: int | float | None = None
    train_subset: int | None = None  # train on this many random training images only
    resume: bool = False
    time_budget: float | None = None  # seconds
    progress: bool = True


@dataclass
class TrainOutcome:
    """The checkpoint a run left, and what it says of itself (the last epoch's validation accuracies)."""

    checkpoint: Path
    log: Path
    space: str
    epoch: int
    epochs: int
    metrics: dict[str, float]
    main: bool  # rank 0 (the one that wrote the files)


def run_training(request: TrainRequest, *, warn: Log = _stderr_warning, log: Log = _stdout) -> TrainOutcome:
    """Load the data, fit the space to it, train (or resume) the supernet; see `hwnas.train.train_supernet`.

    `log` gets one line on the splits (and the default that sized validation), `warn` one line when the
    batch is cut to the training split's size (rank 0 only, under torchrun).
    """
    from hwnas import spaces
    from hwnas.checkpoint import load_checkpoint
    from hwnas.data import load_dataset
    from hwnas.train import LOG_NAME, train_supernet

    config = request.config.check()
    check_output_dir(request.out)
    dataset = load_dataset(request.data, val_size=request.val_size, seed=0)
    if dataset.untrained:
        raise DataError(dataset.untrained)
    if request.train_subset is not None:
        if not 1 <= request.train_subset <= len(dataset.train):
            raise DataError(f"--train-subset must lie in 1..{len(dataset.train)} (the training images of "
                            f"{dataset.spec}), got {request.train_subset}")
        spec = f"{dataset.spec} (train subset {request.train_subset}, seed 0)"
        dataset = dataclasses.replace(dataset, train=dataset.train.subset(request.train_subset, seed=0), spec=spec)
    space = spaces.get(request.space, in_channels=dataset.in_channels, num_classes=dataset.num_classes)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        log(_splits_line(dataset, request.val_size))
    config = _fit_batch(config, len(dataset.train), int(os.environ.get("WORLD_SIZE", "1")), warn if main else None)
    if config.warmup_epochs >= config.epochs and main:  # after the inputs are known good: errors come first
        warn(f"--warmup-epochs {config.warmup_epochs:g} covers all {config.epochs} epoch(s): the learning rate rises "
             "until the last step and never decays")
    path = train_supernet(space, dataset, config, request.out, resume=request.resume, progress=request.progress,
                          verbose=True, time_budget=request.time_budget)
    state: dict[str, Any] = load_checkpoint(path) if main else {}
    return TrainOutcome(checkpoint=path, log=path.parent / LOG_NAME, space=space.name,
                        epoch=int(state.get("epoch", 0)),
                        epochs=int(state.get("train_config", {}).get("epochs", config.epochs)),
                        metrics=dict(state.get("metrics", {})), main=main)


def _splits_line(dataset: Dataset, val_size: int | float | None) -> str:
    """One line: how many images each split holds, and by which rule validation was sized."""
    rule = ""
    if dataset.val_carved:
        rule = (f" (--val-size {val_size:g})" if val_size is not None else
                f" (--val-size default: {DEFAULT_VAL_SIZE} or {DEFAULT_VAL_FRACTION * 100:g} % of the training images, "
                "whichever is smaller)")
    return (f"data {dataset.spec}: {len(dataset.train)} training, {len(dataset.val)} validation{rule}, "
            f"{len(dataset.test)} test images")


def _fit_batch(config: TrainConfig, images: int, world: int, warn: Log | None) -> TrainConfig:
    """`config` with the batch cut to the training split when it is larger (a whole multiple of the ranks), so a
    small folder trains with the default batch instead of making no step; the same split gives the same batch,
    so a resume with the same command agrees with the checkpoint."""
    fits = (images // world) * world
    if config.batch_size <= images or fits < 1:
        return config  # fits < 1: fewer images than ranks, which the trainer refuses in one line
    if warn is not None:
        warn(f"--batch-size {config.batch_size} is larger than the {images} training images: training with "
             f"batches of {fits} (one step per epoch)")
    return dataclasses.replace(config, batch_size=fits)


__all__ = ["TrainOutcome", "TrainRequest", "run_training"]
