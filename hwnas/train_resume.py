"""Stopping a supernet training run and continuing it: SIGTERM, the run's files, the checks on resume.

A run stops in one of three ways, and each leaves a checkpoint that `--resume` can continue on
the same trajectory: the end of an epoch, a SIGTERM (a scheduler's pre-emption), which the
trainer honours at the next step boundary after saving, and a kill, which loses at most the epoch
under way. The log is rewritten whole from the checkpoint's history at every save, so it never
holds a row the checkpoint does not. A checkpoint continues only the run that wrote it: the same
space spec, dataset and recipe (`RESUME_MAY_CHANGE` lists the settings that do not move the
trajectory); anything else is refused with a `CheckpointError` naming the field.
"""

from __future__ import annotations

import contextlib
import csv
import io
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

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
                 config: TrainConfig) -> None:
    """Refuse a checkpoint of another space spec, dataset or recipe: continuing it would be another run."""
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
    stored = TrainConfig.from_dict(state["train_config"]).to_dict()
    for name, value in config.to_dict().items():
        if name not in RESUME_MAY_CHANGE and stored.get(name) != value:
            raise CheckpointError(f"{path}: train_config.{name} is {stored.get(name)!r} in the checkpoint, "
                                  f"{value!r} now; resume with the same settings or start a new --out")


@contextlib.contextmanager
def resume_field(path: Path, name: str) -> Iterator[None]:
    """Whatever a malformed field of a checkpoint raises on resume, as one line naming the file and the field."""
    try:
        yield
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError, HwnasError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: field '{name}' ({reason})") from None


__all__ = ["CHECKPOINT_NAME", "CONFIG_NAME", "LOG_COLUMNS", "LOG_NAME", "RESUME_MAY_CHANGE", "StopRequest",
           "TrainingInterrupted", "check_resume", "resume_field", "sigterm_to", "write_log"]
