"""`run_training`: everything `hwnas train` does, as one library call: the data by its spec, the space fitted to
its channels and classes, a supernet trained on it with the sandwich rule (`hwnas.train.train_supernet`).

Under torchrun every rank calls it; rank 0 writes the files and `TrainOutcome.main` says which
rank this is, so a caller prints once.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwnas.errors import DataError
from hwnas.fileio import check_output_dir
from hwnas.recipe import TrainConfig

Log = Callable[[str], None]


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class TrainRequest:
    """What to train: a space preset by name, the dataset spec it learns, the recipe, and where the run goes."""

    space: str
    out: Path
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: str = "fashion-mnist"
    val_size: int = 5000  # training images held out as the validation split
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


def run_training(request: TrainRequest, *, warn: Log = _stderr_warning) -> TrainOutcome:
    """Load the data, fit the space to it, train (or resume) the supernet; see `hwnas.train.train_supernet`."""
    from hwnas import spaces
    from hwnas.checkpoint import load_checkpoint
    from hwnas.data import load_dataset
    from hwnas.train import LOG_NAME, train_supernet

    config = request.config.check()
    check_output_dir(request.out)
    dataset = load_dataset(request.data, val_size=request.val_size, seed=0)
    if request.train_subset is not None:
        if not 1 <= request.train_subset <= len(dataset.train):
            raise DataError(f"--train-subset must lie in 1..{len(dataset.train)} (the training images of "
                            f"{dataset.spec}), got {request.train_subset}")
        spec = f"{dataset.spec} (train subset {request.train_subset}, seed 0)"
        dataset = dataclasses.replace(dataset, train=dataset.train.subset(request.train_subset, seed=0), spec=spec)
    space = spaces.get(request.space, in_channels=dataset.in_channels, num_classes=dataset.num_classes)
    main = int(os.environ.get("RANK", "0")) == 0
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


__all__ = ["TrainOutcome", "TrainRequest", "run_training"]
