"""The training recipe and the pieces supernet training and stand-alone training share.

A supernet and a subnet trained alone from scratch are only comparable when they learn under one
recipe: the same optimizer and weight decay rule, the same warm-up and cosine, the same autocast,
the same inputs at the same resolutions, the same data order for a given seed and epoch. Both
`hwnas.train` and `hwnas.standalone` take these from here, so changing the recipe changes both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError
from hwnas.sampling import SAMPLERS


class TrainingError(HwnasError):
    """Training stopped: a non-finite loss, a collapse of accuracy, or settings that cannot train."""


@dataclass
class TrainConfig:
    """The recipe. Everything here except `device` and `log_every` is part of the trajectory; `lr`, `grad_clip` and
    `collapse_drop` may still change on a resume, to recover a run from its last good checkpoint
    (`hwnas.train_resume.RESUME_MAY_ADJUST`).

    `batch_size` is global: under torchrun each of N ranks takes `batch_size // N` images of each
    step, so the recipe means the same at any scale.
    """

    epochs: int = 40
    batch_size: int = 512
    lr: float = 0.25
    optimizer: str = "sgd"  # "sgd" | "adamw"
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    nesterov: bool = True
    weight_decay: float = 2e-4  # not on BN weights, biases or kernel transforms
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    label_smoothing: float = 0.1  # the largest subnet's loss on the labels
    num_sampled: int = 2  # subnets per step besides the largest and the smallest
    sampler: str = "uniform"  # "uniform" | "attentive-best" | "attentive-worst"
    attentive_k: int = 3  # candidates an attentive sampler scores per sampled subnet
    kd_temperature: float = 1.0
    kd_weight: float = 1.0  # students' loss: kd_weight * KL(teacher) + (1 - kd_weight) * CE(labels)
    augment: bool = True  # random crop (zero padding) and horizontal flip
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    amp: bool = True  # autocast on CUDA (ignored on CPU)
    amp_dtype: str = "bf16"  # "bf16" | "fp16" (fp16 adds a gradient scaler)
    channels_last: bool = True  # NHWC: cuDNN's and oneDNN's depthwise kernels are faster (CPU: 1.6x a step)
    kernel_transform: bool = False  # OFA's learned kernel transforms in the supernet
    seed: int = 0
    steps_per_epoch: int | None = None  # cap, for quick runs; None: the whole training split
    log_every: int = 20  # steps between progress updates, NaN checks and SIGTERM checks (DDP)
    val_batches: int | None = None  # cap on validation batches per epoch; None: the whole split
    eval_batch_size: int = 500
    bn_batches: int = 8  # training batches (of batch_size) that re-estimate BN before each evaluation
    collapse_drop: float | None = 15.0  # stop if the largest's val accuracy falls this many points below
    # its best (or more than a small validation set's noise), or back to chance after being 10 points above it;
    # None: no collapse check
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as a checkpoint and train_config.json store them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config of `to_dict`; keys this version does not know (a newer file's) are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check(self) -> TrainConfig:
        """Refuse settings that cannot train, naming the field."""
        positive = ("epochs", "batch_size", "log_every", "eval_batch_size", "bn_batches", "attentive_k")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "val_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainingError(f"train config: {name} must be >= 1 or None, got {value}")
        checks = [
            ("lr", self.lr > 0), ("weight_decay", self.weight_decay >= 0), ("warmup_epochs", self.warmup_epochs >= 0),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1), ("label_smoothing", 0 <= self.label_smoothing < 1),
            ("num_sampled", self.num_sampled >= 0), ("kd_temperature", self.kd_temperature > 0),
            ("kd_weight", 0 <= self.kd_weight <= 1), ("momentum", 0 <= self.momentum < 1),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0),
            ("collapse_drop", self.collapse_drop is None or self.collapse_drop > 0),
        ]
        for name, ok in checks:
            if not ok:
                raise TrainingError(f"train config: {name} = {getattr(self, name)} is out of range")
        if self.optimizer not in ("sgd", "adamw"):
            raise TrainingError(f"train config: optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.sampler not in SAMPLERS:
            raise TrainingError(f"train config: sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.amp_dtype not in ("bf16", "fp16"):
            raise TrainingError(f"train config: amp_dtype must be 'bf16' or 'fp16', got {self.amp_dtype!r}")
        return self


class CosineSchedule:
    """Linear warm-up from lr/warmup to lr, then a cosine to lr * min_ratio, evaluated per step."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> None:
        self.base_lr, self.total_steps = float(base_lr), int(total_steps)
        self.warmup_steps, self.min_ratio = int(min(warmup_steps, total_steps)), float(min_ratio)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based); past `total_steps` it stays at the end."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.base_lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def state_dict(self) -> dict[str, Any]:
        """The schedule's settings, recorded in a checkpoint (the step is the trainer's)."""
        return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_ratio": self.min_ratio}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW, with weight decay only on conv and linear weights.

    BN affine parameters and biases are excluded (decaying them only shrinks the scale that BN
    restores), and so are OFA's kernel transforms, which start as the identity and would be
    pulled towards zero.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "transforms" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


# Standard errors of the difference of two accuracies beyond which a drop is not noise (see `collapse_reason`).
COLLAPSE_SIGMAS = 3.0


def noise_points(acc_a: float, acc_b: float, n: int) -> float:
    """`COLLAPSE_SIGMAS` standard errors (in points) of the difference of two accuracies measured on `n` images.

    Were nothing to have changed, both are binomial estimates of one accuracy p (pooled from the two) on the n
    validation images, and their difference has the standard error sqrt(2 p (1 - p) / n). Three of them make
    a false alarm a one-sided 0.13 % event per epoch: about one in twenty over a 40-epoch run even though the
    best epoch so far is the largest of up to 40 such estimates. On 40 images at 50 % that is 34 points; on
    5000 at 90 %, under 2 (the fixed `collapse_drop` then decides).
    """
    p = min(max((acc_a + acc_b) / 200.0, 0.0), 1.0)
    return 100.0 * COLLAPSE_SIGMAS * math.sqrt(2.0 * p * (1.0 - p) / max(int(n), 1))


def collapse_reason(history: Sequence[dict[str, float]], acc: float, num_classes: int, drop: float | None,
                    n: int = 5000) -> str:
    """Why the largest's validation accuracy `acc` counts as a collapse (`TrainConfig.collapse_drop`), or ''.

    `history` is the log rows of the epochs before, `n` the validation images both were measured on; `drop`
    None turns the check off. A fall counts when it exceeds both `drop` points and what `n` images cannot
    tell from noise (`noise_points`): a drop of 20 points on 40 images is a handful of images.
    """
    if drop is None or not history:
        return ""
    best = max(row["val_acc_largest"] for row in history)
    chance = 100.0 / num_classes
    noise = noise_points(best, acc, n)
    if best > chance + 10 and acc <= chance + 5 and best - acc > noise:
        return f"fell to chance ({acc:.2f} %, chance {chance:.1f} %, best so far {best:.2f} %)"
    if best - acc > max(drop, noise):
        limit = f"{noise:.1f} points on {n} validation images" if noise > drop else f"{drop:g}"
        return f"fell {best - acc:.1f} points below its best ({acc:.2f} % vs {best:.2f} %; limit {limit})"
    return ""


def recovery_advice(config: TrainConfig, alternative: str, when: str = "") -> str:
    """What a run stopped by a collapse or a non-finite loss should do next: the flags that continue it from its
    last good checkpoint at half the learning rate, or `alternative` (`when` says when), appended to the same
    command. `hwnas.train_resume.RESUME_MAY_ADJUST` is what lets `--resume` take them."""
    return (f"rerun the same command with '--resume --lr {config.lr / 2:g}' appended (half the learning rate), "
            f"or with '{alternative}'" + (f" {when}" if when else ""))


def autocast(device: torch.device, config: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `config.amp_dtype` on CUDA when `config.amp`; a no-op elsewhere (CPUs train in float32).

    fp16 also needs the gradient scaler, which each trainer makes itself (it is part of its state).
    """
    if device.type != "cuda" or not config.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp_dtype == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


class ResolutionCache:
    """One batch at every resolution a step asks for, resized once per resolution.

    A sandwich step runs several subnets, often at the same resolution: resizing (and the copy to
    channels-last) once per resolution and step, not once per subnet, keeps it off the step's time.
    """

    def __init__(self, x: torch.Tensor, channels_last: bool) -> None:
        self.channels_last = channels_last
        self.cache: dict[int, torch.Tensor] = {}
        self.x = x

    def at(self, resolution: int) -> torch.Tensor:
        """The batch resized to `resolution` (bilinear, antialiased), channels-last if asked for."""
        if resolution not in self.cache:
            x = self.x
            if x.shape[-1] != resolution:  # linear, so resizing after normalisation is the same
                x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                  antialias=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.cache[resolution] = x
        return self.cache[resolution]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened outputs, times T^2 (Hinton), in float32."""
    t = float(temperature)
    log_student = F.log_softmax(student.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * (t * t)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's data order and augmentation on one rank.

    It depends only on (seed, epoch, rank), so a run resumed at an epoch boundary (or killed and
    continued) sees the same batches as one that never stopped.
    """
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63)


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it detached, on the CPU and contiguous: what a checkpoint stores.

    A state saved this way from a GPU or channels-last run loads anywhere, in the default layout.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", memory_format=torch.contiguous_format)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


__all__ = ["COLLAPSE_SIGMAS", "CosineSchedule", "ResolutionCache", "TrainConfig", "TrainingError", "autocast",
           "collapse_reason", "epoch_seed", "kd_loss", "make_optimizer", "noise_points", "recovery_advice", "to_cpu"]
