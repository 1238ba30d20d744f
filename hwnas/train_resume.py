"""Stopping a supernet training run and continuing it: SIGTERM, the run's files, the checks on resume.

A run stops in one of three ways, and each leaves a checkpoint that `--resume` can continue on
the same trajectory: the end of an epoch, a SIGTERM (a scheduler's pre-emption), which the
trainer honours at the next step boundary after saving, and a kill, which loses at most the epoch
under way. The log is rewritten whole from the checkpoint's history at every save, so it never
holds a row the checkpoint does not. A checkpoint continues only the run that wrote it: the same
space spec, dataset, validation split and recipe (`RESUME_MAY_CHANGE` lists the settings that do
not move the trajectory); anything else is refused with a `CheckpointError` naming the field.

One exception: `RESUME_MAY_ADJUST` (learning rate, gradient clipping, the collapse check) may
change, because they are how a run stopped by a collapse or a non-finite loss is continued from
its last good checkpoint (what those errors advise). The run then leaves its old trajectory from
the resumed step on, and `check_resume` returns the changes so that the trainer says so.
"""

from __future__ import annotations

import contextlib
import csv
import io
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from hwnas.checkpoint import nonfinite_tensor
from hwnas.errors import CheckpointError, HwnasError
from hwnas.fileio import atomic_write_text
from hwnas.recipe import TrainConfig

if TYPE_CHECKING:
    from hwnas.data import Dataset
    from hwnas.space import SearchSpace

CHECKPOINT_NAME = "supernet.pt"
LOG_NAME = "train_log.csv"
CONFIG_NAME = "train_config.json"
LOG_COLUMNS = ("epoch", "loss", "kd_loss", "val_acc_largest", "val_acc_smallest", "lr", "images_per_s", "seconds")
# TrainConfig fields that may change between a run and its resume: they do not move the trajectory.
RESUME_MAY_CHANGE = frozenset({"device", "log_every"})
# Fields that may change on a resume although they move the trajectory from there on: the recovery from a
# collapse or a divergence (a lower --lr, --grad-clip, --no-collapse-check where the fall was noise). The
# schedule keeps its step and shape; only its peak, the clipping or the check differ.
RESUME_MAY_ADJUST = frozenset({"lr", "grad_clip", "collapse_drop"})


class TrainingInterrupted(Exception):
    """A SIGTERM stopped training at a step boundary after the state was saved to `checkpoint`."""

    def __init__(self, checkpoint: Path, epoch: int, step_in_epoch: int) -> None:
        super().__init__(f"interrupted by SIGTERM in epoch {epoch + 1} after step {step_in_epoch}; "
                         f"state saved to {checkpoint}; continue with --resume")
        self.checkpoint, self.epoch, self.step_in_epoch = checkpoint, epoch, step_in_epoch


class StopRequest:
    """Set by the SIGTERM handler; the loop reads it at step boundaries (nothing else happens in a handler)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        """A SIGTERM arrived."""
        return self.signum is not None


@contextlib.contextmanager
def sigterm_to(stop: StopRequest) -> Iterator[None]:
    """Route SIGTERM to `stop` for the duration, then put back the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread; a trainer in another thread cannot be stopped this way
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_log(path: Path, history: Sequence[dict[str, float]]) -> None:
    """Write the whole per-epoch log (`LOG_COLUMNS`) atomically, floats to 6 significant digits."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def check_resume(path: Path, state: dict[str, Any], space: SearchSpace, dataset: Dataset,
                 config: TrainConfig, *, say: bool = True) -> None:
    """Refuse a checkpoint of another space spec, dataset, validation split or recipe (continuing it would be
    another run), or one whose weights are not finite. A `RESUME_MAY_ADJUST` change of an unfinished run is
    said in a warning (where `say`: rank 0)."""
    stored_space = state["space"]
    if stored_space.get("name") != space.name:
        raise CheckpointError(f"checkpoint {path} was trained on space '{stored_space.get('name')}', "
                              f"not '{space.name}'")
    if stored_space != space.to_dict():
        raise CheckpointError(f"checkpoint {path} was trained on another spec of space '{space.name}' "
                              f"(field 'space' differs)")
    if state.get("dataset") != dataset.spec:
        raise CheckpointError(f"checkpoint {path} was trained on dataset '{state.get('dataset')}', "
                              f"not '{dataset.spec}'")
    recorded = state.get("val_size")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and dataset.val_carved \
            and recorded != len(dataset.val):
        raise CheckpointError(f"{path}: the run held out {recorded} training images for validation, this one "
                              f"{len(dataset.val)}; resume with --val-size {recorded}")
    stored = TrainConfig.from_dict(state["train_config"]).to_dict()
    adjusted = []
    for name, value in config.to_dict().items():
        if name in RESUME_MAY_CHANGE or stored.get(name) == value:
            continue
        if name not in RESUME_MAY_ADJUST:
            raise CheckpointError(f"{path}: train_config.{name} is {stored.get(name)!r} in the checkpoint, "
                                  f"{value!r} now; resume with the same settings or start a new --out")
        adjusted.append(f"{name} {stored.get(name)!r} -> {value!r}")
    if state.get("complete"):
        return
    bad = nonfinite_tensor(state["model"])
    if bad:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: field 'model' is not finite: {bad}")
    if adjusted and say:
        warnings.warn(f"resuming {path} with {', '.join(adjusted)}: from epoch {int(state['epoch']) + 1} on, the run "
                      "leaves the trajectory it was on", stacklevel=5)


@contextlib.contextmanager
def resume_field(path: Path, name: str) -> Iterator[None]:
    """Whatever a malformed field of a checkpoint raises on resume, as one line naming the file and the field."""
    try:
        yield
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError, HwnasError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: field '{name}' ({reason})") from None


__all__ = ["CHECKPOINT_NAME", "CONFIG_NAME", "LOG_COLUMNS", "LOG_NAME", "RESUME_MAY_ADJUST", "RESUME_MAY_CHANGE",
           "StopRequest", "TrainingInterrupted", "check_resume", "resume_field", "sigterm_to", "write_log"]
