"""Hooks into supernet training: what a caller sees of a run while it runs, and where it may step in.

`train_supernet` calls every `Callback` at four points of the loop with a `StepInfo`; tests use
them to inject faults (a NaN loss, a SIGTERM mid-epoch) and to read the weights on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hwnas.supernet import Supernet


@dataclass
class StepInfo:
    """Where training is, for callbacks (all counts 0-based).

    `epoch` is the epoch being trained; `step` and `step_in_epoch` index the optimizer step being
    taken (in `on_loss`) or just taken (in `on_step_end`). In `on_epoch_end` and `on_train_end`,
    `epoch` and `step` count the epochs and steps completed.
    """

    epoch: int
    step: int
    step_in_epoch: int
    rank: int
    world_size: int
    model: Supernet


class Callback:
    """Hooks into training; subclass and override what you need (tests use them to inject faults)."""

    def on_loss(self, info: StepInfo, role: str, loss: torch.Tensor) -> torch.Tensor:
        """Each subnet's loss before its backward pass; role: 'largest', 'sampled<i>' or 'smallest'."""
        return loss

    def on_step_end(self, info: StepInfo) -> None:
        """After the optimizer step (`info.step` is the index of the step just taken)."""

    def on_epoch_end(self, info: StepInfo, row: dict[str, float]) -> None:
        """After the epoch's checkpoint and log row were written."""

    def on_train_end(self, info: StepInfo) -> None:
        """After the final checkpoint was written (every rank calls it)."""


__all__ = ["Callback", "StepInfo"]
