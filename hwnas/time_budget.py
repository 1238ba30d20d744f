"""Fitting supernet training into a time budget: as many epochs as fit, timed on a probe first.

A cosine schedule cut off by a deadline never reaches its low learning rates, and the weights it
leaves behind are the noisy ones of the middle of training. `hwnas train --time-budget` therefore
decides the number of epochs before the first step, from a few real sandwich steps and one
epoch-end evaluation of a throwaway trainer, and the schedule then runs to its end.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as tdist

from hwnas.distributed import Dist, epoch_shard
from hwnas.recipe import TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from hwnas.arch import Arch
    from hwnas.data import Dataset


class Probe(Protocol):
    """What the planner needs of a trainer: its batch and epoch sizes, its model, and one step at a time."""

    @property
    def config(self) -> TrainConfig: ...
    @property
    def model(self) -> nn.Module: ...
    @property
    def steps_per_epoch(self) -> int: ...
    @property
    def local_batch(self) -> int: ...
    @property
    def largest(self) -> Arch: ...
    @property
    def smallest(self) -> Arch: ...

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One sandwich step, the optimizer step included."""

    def check(self) -> bool:
        """Synchronise the device and the ranks (a TrainingError on a non-finite loss)."""

    def val_accuracy(self, arch: Arch) -> float:
        """The epoch-end evaluation of one subnet."""


def plan_epochs(make_probe: Callable[[TrainConfig], Probe], dataset: Dataset, config: TrainConfig, d: Dist,
                device: torch.device, seconds: float, verbose: bool, probe_steps: int = 8,
                warmup_steps: int = 3) -> int:
    """How many epochs (at most config.epochs) fit in `seconds`, timed on a throwaway supernet.

    The probe runs real sandwich steps (the same code, device, batch and sampler) after a few
    untimed warm-up steps, and one epoch-end evaluation; rank 0's estimate is used by every rank.
    Ten per cent of what is left and 5 s are kept back for what the probe cannot see.
    """
    start = time.perf_counter()
    probe = make_probe(dataclasses.replace(config, epochs=1, seed=config.seed + 1))
    shard = epoch_shard(dataset.train, 0, probe.config.seed, d)
    n = min(probe.steps_per_epoch, warmup_steps + probe_steps)
    batches = list(shard.batches(probe.local_batch, shuffle=False, augment=config.augment, drop_last=True,
                                 device=device, max_batches=n))
    probe.model.train()
    timed = 0
    for i, (x, y) in enumerate(batches):
        if i == min(warmup_steps, n - 1):
            probe.check()  # flush the queue before reading the clock
            t0 = time.perf_counter()
        probe.step(x, y)
        timed += i >= min(warmup_steps, n - 1)
    probe.check()
    step_seconds = (time.perf_counter() - t0) / max(timed, 1)
    t1 = time.perf_counter()
    probe.val_accuracy(probe.largest)
    probe.val_accuracy(probe.smallest)
    eval_seconds = time.perf_counter() - t1 + 0.5  # + extraction and checkpoint writing
    epoch_seconds = probe.steps_per_epoch * step_seconds + eval_seconds
    left = seconds - (time.perf_counter() - start)
    fit = int((0.9 * left - 5.0) // epoch_seconds)
    estimate = torch.tensor([float(fit), epoch_seconds], dtype=torch.float64, device=device)
    if d.enabled:
        tdist.broadcast(estimate, 0)
    fit, epoch_seconds = int(estimate[0].item()), float(estimate[1].item())
    epochs = max(1, min(config.epochs, fit))
    if fit < 1 and d.main:
        print(f"hwnas train: warning: one epoch takes about {epoch_seconds:.0f} s here, more than the "
              f"{seconds:.0f} s time budget; training one anyway (--steps-per-epoch or --train-subset shorten "
              "an epoch)", file=sys.stderr, flush=True)
    if verbose:
        print(f"time budget {seconds:.0f} s: {epochs} epoch(s) of at most {config.epochs} "
              f"(probe: {step_seconds * 1e3:.1f} ms/step x {probe.steps_per_epoch} steps + {eval_seconds:.1f} s "
              f"evaluation = {epoch_seconds:.1f} s/epoch)", flush=True)
    del probe, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return epochs


__all__ = ["Probe", "plan_epochs"]
