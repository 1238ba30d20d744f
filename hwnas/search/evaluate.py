"""Supernet accuracy of an arch on the validation split, after BN recalibration, cached by `arch_id`.

A subnet cut from the supernet inherits BN statistics averaged over every subnet training
sampled; its accuracy only means something after re-estimating them on a few training batches
(AttentiveNAS, Once-for-All). The subnet is extracted first, so the supernet keeps its own
statistics. Search ranks on the validation split; the test split is for reporting the final
arch once (pass `dataset.test` to a second evaluator for that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hwnas.evaluation import EvalSettings, subnet_accuracy

if TYPE_CHECKING:
    from hwnas.data import Split
    from hwnas.supernet import Supernet


class SupernetEvaluator:
    """`AccuracyEvaluator` (accuracy in %) of subnets of `supernet` on `split`.

    `calibration` is a training split: `bn_batches` seeded batches of `bn_batch_size` images
    re-estimate BN; `batch_size` and `max_batches` bound the evaluation on `split` (None: all of
    it). Results are cached by `arch_id`, so a search or a confirmation step never pays twice.
    """

    def __init__(self, supernet: Supernet, split: Split, calibration: Split, *, batch_size: int = 500,
                 max_batches: int | None = None, bn_batches: int = 8, bn_batch_size: int = 256,
                 device: str | torch.device = "cpu", seed: int = 0, channels_last: bool | None = None) -> None:
        self.device = torch.device(device)
        self.supernet = supernet.to(self.device).eval()
        self.split, self.calibration = split, calibration
        self.batch_size, self.max_batches = int(batch_size), max_batches
        self.bn_batches, self.bn_batch_size = int(bn_batches), int(bn_batch_size)
        self.seed = int(seed)
        # NHWC pays off on CUDA (cuDNN's depthwise kernels); on a CPU the conversions cost more than they save
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.cache: dict[str, float] = {}
        self.evaluations = 0

    @property
    def images(self) -> int:
        """Validation images each evaluation sees."""
        if self.max_batches is None:
            return len(self.split)
        return min(len(self.split), self.batch_size * self.max_batches)

    def evaluate(self, arch: Any) -> float:
        key = arch.arch_id
        if key not in self.cache:
            self.cache[key] = subnet_accuracy(
                self.supernet, arch, self.split, self.calibration, device=self.device, bn_batches=self.bn_batches,
                bn_batch_size=self.bn_batch_size, batch_size=self.batch_size, max_batches=self.max_batches,
                seed=self.seed, channels_last=self.channels_last)
            self.evaluations += 1
        return self.cache[key]

    def evaluate_many(self, archs: Sequence[Any]) -> np.ndarray:
        return np.array([self.evaluate(a) for a in archs], dtype=np.float64)

    @property
    def settings(self) -> EvalSettings:
        """How each arch is scored, as an export repeats it (`hwnas.evaluation.EvalSettings`)."""
        return EvalSettings(bn_batches=self.bn_batches, bn_batch_size=self.bn_batch_size, seed=self.seed,
                            batch_size=self.batch_size, val_batches=self.max_batches)

    def validation_batch(self, batch_size: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One seeded, shuffled batch of the validation split at `resolution`, on this evaluator's device."""
        return _one_batch(self.split, batch_size, resolution, seed, self.device)

    def training_batch(self, batch_size: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One seeded, shuffled batch of the training (calibration) split at `resolution`."""
        return _one_batch(self.calibration, batch_size, resolution, seed, self.device)

    def with_supernet(self, supernet: Supernet) -> SupernetEvaluator:
        """An evaluator on other weights (e.g. fine-tuned by a search): the same data and settings, an empty cache."""
        return SupernetEvaluator(supernet, self.split, self.calibration, batch_size=self.batch_size,
                                 max_batches=self.max_batches, bn_batches=self.bn_batches,
                                 bn_batch_size=self.bn_batch_size, device=self.device, seed=self.seed,
                                 channels_last=self.channels_last)


def _one_batch(split: Split, batch_size: int, resolution: int, seed: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(split.batches(batch_size, resolution=resolution, shuffle=True, seed=seed, device=device,
                                   max_batches=1)))
    return x, y
