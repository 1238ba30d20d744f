"""Accuracy of a subnet cut from a supernet: BN re-estimation, then counting, the same for every caller.

Training scores the largest and smallest subnets each epoch, the search scores every candidate,
the export scores what it ships: all three must see one procedure, or a model's exported accuracy
would differ from the figure the search chose it by. A subnet cut from a supernet inherits BN
statistics averaged over every subnet training sampled; its accuracy only means something after
re-estimating them on a few seeded training batches (Once-for-All, BigNAS), and `EvalSettings`
records how many, so an export repeats exactly what the search did. Below training, search and
deploy: it imports the supernet, the data splits and BN re-estimation, nothing above them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hwnas.errors import DeviceError, HwnasError
from hwnas.supernet.bn import recalibrate_bn

if TYPE_CHECKING:
    from hwnas.arch import Arch
    from hwnas.data import Split
    from hwnas.supernet import Supernet


@dataclass(frozen=True)
class EvalSettings:
    """How a subnet is scored: BN re-estimated on `bn_batches` seeded training batches of `bn_batch_size`,
    then counted on batches of `batch_size` (at most `val_batches` of the validation split; None: all)."""

    bn_batches: int = 8
    bn_batch_size: int = 256
    seed: int = 0
    batch_size: int = 500
    val_batches: int | None = None

    def check(self) -> EvalSettings:
        """Refuse counts that cannot score anything, naming the setting."""
        for name in ("bn_batches", "bn_batch_size", "batch_size"):
            if getattr(self, name) < 1:
                raise HwnasError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_batches is not None and self.val_batches < 1:
            raise HwnasError(f"val_batches must be >= 1 or None, got {self.val_batches}")
        return self

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalSettings:
        """The settings a search wrote into its run record (defaults for what it did not record)."""
        defaults = cls()

        def count(name: str) -> int:
            value = record.get(name)
            return int(getattr(defaults, name) if value is None else value)

        cap = record.get("val_batches")
        return cls(bn_batches=count("bn_batches"), bn_batch_size=count("bn_batch_size"), seed=count("seed"),
                   batch_size=count("batch_size"), val_batches=None if cap is None else int(cap))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULT_SETTINGS = EvalSettings()


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """'auto' is CUDA when torch sees a GPU; under torchrun each rank takes GPU LOCAL_RANK."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: torch {torch.__version__} sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported (cpu, cuda, cuda:N)")
    return device


def _memory_format(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], channels_last: bool
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in batches:
        yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, resolution: int, *, device: torch.device, batch_size: int = 500,
             max_batches: int | None = None, channels_last: bool = False) -> tuple[int, int]:
    """(correct, total) of `model` in eval mode on `split` at `resolution`, in float32."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    batches = split.batches(batch_size, resolution=resolution, device=device, max_batches=max_batches)
    try:
        for x, y in _memory_format(batches, channels_last):
            correct += (model(x).argmax(1) == y).sum()
            total += y.numel()
    finally:
        model.train(was_training)
    return int(correct.item()), total


def accuracy(model: nn.Module, split: Split, resolution: int, *, device: torch.device | str = "cpu",
             batch_size: int = 500, max_batches: int | None = None, channels_last: bool = False) -> float:
    """`evaluate` as a percentage."""
    correct, total = evaluate(model, split, resolution, device=torch.device(device), batch_size=batch_size,
                              max_batches=max_batches, channels_last=channels_last)
    return 100.0 * correct / max(total, 1)


def calibration_batches(train: Split, resolution: int, *, batch_size: int, n_batches: int,
                        device: torch.device, seed: int = 0, channels_last: bool = False
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed training batches (seeded, not augmented) that re-estimate BN before an evaluation."""
    return _memory_format(train.batches(batch_size, resolution=resolution, shuffle=True, seed=seed, device=device,
                                        max_batches=n_batches), channels_last)


def recalibrated_subnet(supernet: Supernet, arch: Arch, train: Split, settings: EvalSettings = DEFAULT_SETTINGS, *,
                        device: torch.device | str = "cpu", channels_last: bool = False) -> nn.Module:
    """The static subnet of `arch` on `device`, in eval mode, BN re-estimated on `settings`' training batches.

    The subnet is extracted first, so the supernet's own statistics stay as they are.
    """
    device = torch.device(device)
    net = supernet.extract(arch).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    recalibrate_bn(net, calibration_batches(train, arch.resolution, batch_size=settings.bn_batch_size,
                                            n_batches=settings.bn_batches, device=device, seed=settings.seed,
                                            channels_last=channels_last))
    return net.eval()


def subnet_accuracy(supernet: Supernet, arch: Arch, split: Split, calibration: Split, *,
                    device: torch.device | str = "cpu", bn_batches: int = 8, bn_batch_size: int = 256,
                    batch_size: int = 500, max_batches: int | None = None, seed: int = 0,
                    channels_last: bool = True) -> float:
    """Accuracy (%) of `arch` cut from `supernet` after re-estimating its BN statistics on `calibration`."""
    settings = EvalSettings(bn_batches=bn_batches, bn_batch_size=bn_batch_size, seed=seed, batch_size=batch_size,
                            val_batches=max_batches)
    net = recalibrated_subnet(supernet, arch, calibration, settings, device=device, channels_last=channels_last)
    return accuracy(net, split, arch.resolution, device=device, batch_size=batch_size, max_batches=max_batches,
                    channels_last=channels_last)


__all__ = ["DEFAULT_SETTINGS", "EvalSettings", "accuracy", "calibration_batches", "evaluate", "recalibrated_subnet",
           "resolve_device", "subnet_accuracy"]
