"""Supernet training: the sandwich rule with in-place distillation, resumable, single process or DDP.

Each step trains, on one batch, the largest subnet on the labels (with label smoothing), then
`num_sampled` subnets from a sampler and the smallest subnet on the largest's detached soft
outputs (in-place distillation, BigNAS): the gradients of all of them are summed and the
optimizer steps once. Every subnet runs at its own resolution (the batch is resized), the same on
every rank, because the sampler's seeded RNG is the same on every rank.

Distributed training does not wrap the model in DistributedDataParallel. A sandwich step runs
several backward passes and elastic depth leaves different blocks unused from step to step, so
DDP would need `no_sync()` around all but the last backward and `find_unused_parameters=True` (a
graph traversal per step), and would then reduce gradients accumulated over subnets that its
unused-parameter bookkeeping only sees the last of. Instead every rank accumulates the step's
gradients locally and one flat all-reduce averages them before the optimizer step: the same
subnets run on every rank, so the set of parameters with a gradient is the same everywhere and
the weights stay identical (tests/test_train.py checks this under torchrun). BN statistics, which
each rank estimates on its own shard, are averaged at the end of each epoch.

Channels are not sorted (`Supernet.sort_channels`) at any point: OFA sorts them before it starts
training narrower widths of an already trained network. Here the narrow widths train from the
first step on the first N channels, which therefore already are the ones the narrow subnets need;
sorting by the widest subnet's importance would hand them other channels and undo their training.

Checkpoints (`hwnas.checkpoint`) are written atomically at the end of every epoch and at the next
step boundary after a SIGTERM; a NaN/inf loss or a collapse of validation accuracy stops training
with `TrainingError` before anything is saved, so the checkpoint on disk is the last good one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from hwnas.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint
from hwnas.data import Dataset, Split
from hwnas.errors import CheckpointError, HwnasError
from hwnas.evaluation import calibration_batches, evaluate, resolve_device, subnet_accuracy
from hwnas.fileio import atomic_write_text
from hwnas.sampling import SAMPLERS, UniformSampler, make_sampler
from hwnas.space import Arch, SearchSpace
from hwnas.supernet import Supernet, recalibrate_bn

CHECKPOINT_NAME = "supernet.pt"
LOG_NAME = "train_log.csv"
CONFIG_NAME = "train_config.json"
LOG_COLUMNS = ("epoch", "loss", "kd_loss", "val_acc_largest", "val_acc_smallest", "lr", "images_per_s", "seconds")
# TrainConfig fields that may change between a run and its resume: they do not move the trajectory.
RESUME_MAY_CHANGE = frozenset({"device", "log_every"})


class TrainingError(HwnasError):
    """Training stopped: a non-finite loss, a collapse of accuracy, or settings that cannot train."""


class TrainingInterrupted(Exception):
    """A SIGTERM stopped training at a step boundary after the state was saved to `checkpoint`."""

    def __init__(self, checkpoint: Path, epoch: int, step_in_epoch: int) -> None:
        super().__init__(f"interrupted by SIGTERM in epoch {epoch + 1} after step {step_in_epoch}; "
                         f"state saved to {checkpoint}; continue with --resume")
        self.checkpoint, self.epoch, self.step_in_epoch = checkpoint, epoch, step_in_epoch


@dataclass
class TrainConfig:
    """The recipe. Everything here except `device` and `log_every` is part of the trajectory.

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
    # its best, or back to chance after being 10 points above it; None: no collapse check
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
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


# ---- callbacks --------------------------------------------------------------------------------------------
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


# ---- pieces shared by supernet and stand-alone training ------------------------------------------------------
class CosineSchedule:
    """Linear warm-up from lr/warmup to lr, then a cosine to lr * min_ratio, evaluated per step."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> None:
        self.base_lr, self.total_steps = float(base_lr), int(total_steps)
        self.warmup_steps, self.min_ratio = int(min(warmup_steps, total_steps)), float(min_ratio)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.base_lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def state_dict(self) -> dict[str, Any]:
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


def _autocast(device: torch.device, config: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda" or not config.amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.amp_dtype == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


class _Inputs:
    """One batch at every resolution a step asks for, resized once per resolution."""

    def __init__(self, x: torch.Tensor, channels_last: bool) -> None:
        self.channels_last = channels_last
        self.cache: dict[int, torch.Tensor] = {}
        self.x = x

    def at(self, resolution: int) -> torch.Tensor:
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


# ---- distributed ------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Join the process group when started by torchrun (RANK / WORLD_SIZE set): NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return _Dist(), device
    if tdist.is_initialized():
        return _Dist(tdist.get_rank(), tdist.get_world_size(), owns_group=False), device
    tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(tdist.get_rank(), tdist.get_world_size(), owns_group=True), device


def _all_reduce(tensor: torch.Tensor, d: _Dist, op: Any = None) -> torch.Tensor:
    if d.enabled:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM if op is None else op)
    return tensor


def _average_gradients(params: Sequence[nn.Parameter], d: _Dist) -> None:
    """One flat all-reduce of every existing gradient (identical sets on all ranks), then / world."""
    grads = [p.grad for p in params if p.grad is not None]
    if not d.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat.div_(d.world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view(g.shape))
        offset += n


def _broadcast_module(model: nn.Module, d: _Dist) -> None:
    """Start every rank from rank 0's parameters and buffers."""
    if d.enabled:
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tdist.broadcast(tensor.data, 0)


def _average_buffers(model: nn.Module, d: _Dist) -> None:
    """Average BN running statistics, which each rank estimated on its own shard.

    Parameters need nothing: averaged gradients keep them identical on every rank.
    """
    if d.enabled:
        with torch.no_grad():
            for b in model.buffers():
                if b.is_floating_point():
                    tdist.all_reduce(b)
                    b.div_(d.world)


def _gather_rng(device: torch.device, d: _Dist) -> list[dict[str, Any]]:
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None}
    if not d.enabled:
        return [state]
    gathered: list[Any] = [None] * d.world
    tdist.all_gather_object(gathered, state)
    return gathered


def _restore_rng(states: list[dict[str, Any]], device: torch.device, d: _Dist) -> None:
    if len(states) != d.world:  # resumed at another scale: a fresh, rank-dependent stream
        torch.manual_seed(hash((len(states), d.rank)) % (2**31))
        return
    state = states[d.rank]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- SIGTERM ------------------------------------------------------------------------------------------------
class _StopRequest:
    """Set by the SIGTERM handler; the loop reads it at step boundaries (nothing else happens in a handler)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def _sigterm_to(stop: _StopRequest) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread; a trainer in another thread cannot be stopped this way
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the training run ----------------------------------------------------------------------------------------
def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", memory_format=torch.contiguous_format)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _bar_interval() -> float:
    """Seconds between bar redraws: often on a terminal, rarely into a log file (each redraw is a line there)."""
    return 0.2 if sys.stderr.isatty() else 10.0


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63)


def _shard(train: Split, epoch: int, seed: int, d: _Dist) -> Split:
    """This rank's rows of the epoch: one global seeded permutation, dealt out rank by rank."""
    n = len(train) - len(train) % d.world
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch, 0)))
    return train.select(order[:n][d.rank::d.world])


def _write_log(path: Path, history: Sequence[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _check_resume(path: Path, state: dict[str, Any], space: SearchSpace, dataset: Dataset,
                  config: TrainConfig) -> None:
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


def _collapse(history: Sequence[dict[str, float]], acc: float, num_classes: int, drop: float | None) -> str:
    """Why the largest's validation accuracy `acc` counts as a collapse, or '' if it does not."""
    if drop is None or not history:
        return ""
    best = max(row["val_acc_largest"] for row in history)
    chance = 100.0 / num_classes
    if best > chance + 10 and acc <= chance + 5:
        return f"fell to chance ({acc:.2f} %, chance {chance:.1f} %, best so far {best:.2f} %)"
    if best - acc > drop:
        return f"fell {best - acc:.1f} points below its best ({acc:.2f} % vs {best:.2f} %; limit {drop:g})"
    return ""


def train_supernet(space: SearchSpace, dataset: Dataset, config: TrainConfig, out_dir: str | Path, *,
                   resume: bool = False, callbacks: Sequence[Callback] = (), progress: bool = True,
                   verbose: bool | None = None, time_budget: float | None = None) -> Path:
    """Train a supernet of `space` on `dataset` with the sandwich rule; returns the checkpoint's path.

    Writes OUT/supernet.pt (every epoch and on SIGTERM), OUT/train_log.csv (one row per epoch)
    and OUT/train_config.json. `resume=True` continues OUT/supernet.pt on the same trajectory
    (or starts fresh if there is none); without it an existing checkpoint is refused rather than
    overwritten. Under torchrun, every rank calls this; rank 0 writes the files. `progress` shows
    a progress bar, `verbose` (default: as `progress`) prints a line per epoch.

    `time_budget` (seconds, from this call): train at most `config.epochs` epochs, as many as fit,
    timed on a few probe steps first, so that the cosine schedule completes within the budget. A
    resumed run keeps the epochs it was planned with.

    Raises TrainingError on a non-finite loss or a collapse (the checkpoint on disk is then the
    last good one) and TrainingInterrupted after saving on SIGTERM.
    """
    started = time.perf_counter()
    verbose = progress if verbose is None else verbose
    config.check()
    if (space.in_channels, space.num_classes) != (dataset.in_channels, dataset.num_classes):
        raise TrainingError(f"space '{space.name}' takes {space.in_channels} channels and {space.num_classes} "
                            f"classes, dataset '{dataset.spec or dataset.name}' has {dataset.in_channels} and "
                            f"{dataset.num_classes} (spaces.get(name, in_channels=..., num_classes=...))")
    if time_budget is not None and time_budget <= 0:
        raise TrainingError(f"time budget must be positive, got {time_budget} s")
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    d, device = _init_distributed(config.device)
    try:
        if time_budget is not None:
            if resume and path.exists():
                stored = load_checkpoint(path)["train_config"].get("epochs", config.epochs)
                config = dataclasses.replace(config, epochs=int(stored))
            else:
                config = dataclasses.replace(config, epochs=_plan_epochs(
                    space, dataset, config, d, device, time_budget - (time.perf_counter() - started),
                    verbose and d.main))
        trainer = _Trainer(space, dataset, config, out_dir, path, d, device, list(callbacks), progress, verbose)
        return trainer.run(resume)
    finally:
        if d.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


def _plan_epochs(space: SearchSpace, dataset: Dataset, config: TrainConfig, d: _Dist, device: torch.device,
                 seconds: float, verbose: bool, probe_steps: int = 8, warmup_steps: int = 3) -> int:
    """How many epochs (at most config.epochs) fit in `seconds`, timed on a throwaway supernet.

    The probe runs real sandwich steps (the same code, device, batch and sampler) after a few
    untimed warm-up steps, and one epoch-end evaluation; rank 0's estimate is used by every rank.
    Ten per cent of what is left and 5 s are kept back for what the probe cannot see.
    """
    start = time.perf_counter()
    probe = _Trainer(space, dataset, dataclasses.replace(config, epochs=1, seed=config.seed + 1),
                     Path("."), Path("."), d, device, [], progress=False)  # writes nothing
    shard = _shard(dataset.train, 0, probe.config.seed, d)
    n = min(probe.steps_per_epoch, warmup_steps + probe_steps)
    batches = list(shard.batches(probe.local_batch, shuffle=False, augment=config.augment, drop_last=True,
                                 device=device, max_batches=n))
    probe.model.train()
    timed = 0
    for i, (x, y) in enumerate(batches):
        if i == min(warmup_steps, n - 1):
            probe._check()  # flush the queue before reading the clock
            t0 = time.perf_counter()
        probe._step(x, y)
        timed += i >= min(warmup_steps, n - 1)
    probe._check()
    step_seconds = (time.perf_counter() - t0) / max(timed, 1)
    t1 = time.perf_counter()
    probe._val_accuracy(probe.largest)
    probe._val_accuracy(probe.smallest)
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


@contextlib.contextmanager
def _field(path: Path, name: str) -> Iterator[None]:
    """Whatever a malformed field of a checkpoint raises on resume, as one line naming the file and the field."""
    try:
        yield
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError, HwnasError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: field '{name}' ({reason})") from None


class _Trainer:
    """The state of one run; `run` is the loop. Split out of `train_supernet` to keep each piece short."""

    def __init__(self, space: SearchSpace, dataset: Dataset, config: TrainConfig, out_dir: Path, path: Path,
                 d: _Dist, device: torch.device, callbacks: list[Callback], progress: bool,
                 verbose: bool = False) -> None:
        self.space, self.dataset, self.config = space, dataset, config
        self.out_dir, self.path, self.d, self.device = out_dir, path, d, device
        self.callbacks, self.progress, self.verbose = callbacks, progress and d.main, verbose and d.main
        if config.batch_size % d.world:
            raise TrainingError(f"train config: batch_size {config.batch_size} must be divisible by the "
                                f"{d.world} ranks of this run")
        self.local_batch = config.batch_size // d.world
        self.steps_per_epoch = (len(dataset.train) // d.world) // self.local_batch
        if config.steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, config.steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise TrainingError(f"train config: batch_size {config.batch_size} is larger than the training "
                                f"split ({len(dataset.train)} images)")
        torch.manual_seed(config.seed)
        self.model = Supernet(space, kernel_transform=config.kernel_transform).to(device)
        self.channels_last = config.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, config)
        total = config.epochs * self.steps_per_epoch
        self.schedule = CosineSchedule(config.lr, total, round(config.warmup_epochs * self.steps_per_epoch),
                                       config.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=device.type == "cuda" and config.amp and config.amp_dtype == "fp16")
        self.sampler: UniformSampler = make_sampler(config.sampler, space, config.seed, k=config.attentive_k)
        self.largest, self.smallest = space.largest(), space.smallest()
        self.roles = ["largest", *(f"sampled{i}" for i in range(config.num_sampled)), "smallest"]
        # progress of the current epoch, saved with a mid-epoch checkpoint so the log row stays whole
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # largest CE, smallest KD
        self.nonfinite = torch.zeros(len(self.roles), device=device)
        self.epoch_seconds, self.epoch_images = 0.0, 0
        self.history: list[dict[str, float]] = []
        val = dataset.val
        if config.val_batches is not None:
            val = val.select(torch.arange(min(len(val), config.val_batches * config.eval_batch_size)))
        self.val = val.select(torch.arange(d.rank, len(val), d.world)) if d.enabled else val
        self.stop = _StopRequest()

    # -- state ---------------------------------------------------------------------------------------
    def _state(self, complete: bool) -> dict[str, Any]:
        rng = _gather_rng(self.device, self.d)  # collective: every rank calls _state
        model_config = {k: v for k, v in self.model.config().items() if k != "space"}
        last = self.history[-1] if self.history else {}
        return {
            "format": FORMAT, "version": VERSION, "space": self.space.to_dict(), "supernet_config": model_config,
            "model": _to_cpu(self.model.state_dict()), "train_config": self.config.to_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "complete": complete, "world_size": self.d.world,
            "optimizer": None if complete else _to_cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "scheduler": {**self.schedule.state_dict(), "step": self.global_step},
            "sampler_rng": self.sampler.state_dict(), "torch_rng": rng,
            "epoch_progress": {"sums": _to_cpu(self.sums), "seconds": self.epoch_seconds,
                               "images": self.epoch_images},
            "history": list(self.history), "dataset": self.dataset.spec,
            "metrics": {k: last[k] for k in ("val_acc_largest", "val_acc_smallest") if k in last},
        }

    def _save(self, complete: bool = False) -> None:
        state = self._state(complete)
        if self.d.main:
            save_checkpoint(self.path, state)
            _write_log(self.out_dir / LOG_NAME, self.history)

    def _load(self) -> bool:
        """Restore a checkpoint; True when it is complete (nothing left to train)."""
        state = load_checkpoint(self.path, map_location="cpu")
        _check_resume(self.path, state, self.space, self.dataset, self.config)
        if state.get("complete"):
            return True
        with _field(self.path, "model"):
            self.model.load_state_dict(state["model"])
        with _field(self.path, "optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        with _field(self.path, "sampler_rng"):
            self.sampler.load_state_dict(state["sampler_rng"])
        if state.get("scaler") is not None and self.scaler.is_enabled():
            with _field(self.path, "scaler"):
                self.scaler.load_state_dict(state["scaler"])
        with _field(self.path, "epoch"):
            self.epoch, self.step_in_epoch = int(state["epoch"]), int(state.get("step_in_epoch", 0))
            self.global_step = int(state.get("global_step", self.epoch * self.steps_per_epoch + self.step_in_epoch))
        with _field(self.path, "epoch_progress"):
            progress = state.get("epoch_progress") or {}
            if "sums" in progress:
                self.sums.copy_(progress["sums"])
            self.epoch_seconds = float(progress.get("seconds", 0.0))
            self.epoch_images = int(progress.get("images", 0))
        with _field(self.path, "history"):
            self.history = list(state.get("history", []))
        with _field(self.path, "torch_rng"):
            _restore_rng(list(state.get("torch_rng", [])), self.device, self.d)
        return False

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, resume: bool) -> Path:
        if self.path.exists() and not resume:
            raise TrainingError(f"{self.path} exists: pass --resume to continue it, or choose another --out")
        if resume and self.path.exists():
            if self._load():
                return self.path
        else:
            _broadcast_module(self.model, self.d)
        if self.d.main:
            atomic_write_text(self.out_dir / CONFIG_NAME, json.dumps(
                {"space": self.space.name, "dataset": self.dataset.spec, "world_size": self.d.world,
                 "train_config": self.config.to_dict()}, indent=2) + "\n")
        with _sigterm_to(self.stop):
            while self.epoch < self.config.epochs:
                self._train_epoch()
                self._end_epoch()
        self._save(complete=True)
        info = self._info()
        for cb in self.callbacks:
            cb.on_train_end(info)
        return self.path

    def _info(self) -> StepInfo:
        return StepInfo(self.epoch, self.global_step, self.step_in_epoch, self.d.rank, self.d.world, self.model)

    def _forward(self, arch: Arch, inputs: _Inputs) -> torch.Tensor:
        with _autocast(self.device, self.config):
            return self.model.set_active(arch)(inputs.at(arch.resolution))

    def _backward(self, info: StepInfo, role: str, loss: torch.Tensor) -> None:
        for cb in self.callbacks:
            loss = cb.on_loss(info, role, loss)
        self.nonfinite[self.roles.index(role)] += (~torch.isfinite(loss.detach())).float()
        self.scaler.scale(loss).backward()

    def _student_loss(self, logits: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        loss = kd_loss(logits, teacher, cfg.kd_temperature)
        if cfg.kd_weight < 1:
            ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss = cfg.kd_weight * loss + (1 - cfg.kd_weight) * ce
        return loss

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.config
        info = self._info()
        lr = self.schedule.lr(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        inputs = _Inputs(x, self.channels_last)

        logits = self._forward(self.largest, inputs)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        self._backward(info, "largest", loss)
        self.sums[0] += loss.detach()
        teacher = logits.detach().float()
        del logits

        def score(candidates: Sequence[Arch]) -> list[float]:
            with torch.no_grad():
                losses = torch.stack([kd_loss(self._forward(a, inputs), teacher, cfg.kd_temperature)
                                      for a in candidates])
            return _all_reduce(losses, self.d).tolist()

        for i in range(cfg.num_sampled):
            arch = self.sampler.sample(score)
            self._backward(info, f"sampled{i}", self._student_loss(self._forward(arch, inputs), teacher, y))
        loss = self._student_loss(self._forward(self.smallest, inputs), teacher, y)
        self._backward(info, "smallest", loss)
        self.sums[1] += loss.detach()

        _average_gradients(self.params, self.d)
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _check(self) -> bool:
        """The synchronisation point: raise on a non-finite loss; True if some rank got SIGTERM."""
        flags = torch.cat([self.nonfinite, torch.tensor([1.0 if self.stop.requested else 0.0],
                                                        device=self.device)])
        values = _all_reduce(flags, self.d, tdist.ReduceOp.MAX if self.d.enabled else None).tolist()
        bad = [role for role, v in zip(self.roles, values[:-1], strict=True) if v > 0]
        if bad:
            kept = (f"the last good checkpoint {self.path} (epoch {self._saved_epoch()}) is kept"
                    if self.path.exists() else "no checkpoint was written yet")
            raise TrainingError(f"non-finite loss of the {', '.join(bad)} subnet(s) in epoch {self.epoch + 1} "
                                f"by step {self.step_in_epoch}; {kept}; lower --lr or set --grad-clip")
        return values[-1] > 0

    def _saved_epoch(self) -> int:
        return len(self.history)

    def _train_epoch(self) -> None:
        cfg, d = self.config, self.d
        shard = _shard(self.dataset.train, self.epoch, cfg.seed, d)
        batches = shard.batches(self.local_batch, shuffle=False, seed=_epoch_seed(cfg.seed, self.epoch, d.rank),
                                augment=cfg.augment, drop_last=True, device=self.device,
                                max_batches=self.steps_per_epoch)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False, dynamic_ncols=True,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", mininterval=_bar_interval())
        self.model.train()
        start = time.perf_counter()
        window_start, window_images, window_sum = start, 0, self.sums[0].item()
        try:
            for x, y in islice(batches, self.step_in_epoch, None):
                self._step(x, y)
                info = self._info()  # the step just taken
                for cb in self.callbacks:
                    cb.on_step_end(info)
                self.step_in_epoch += 1
                self.global_step += 1
                window_images += y.numel() * d.world
                if bar is not None:
                    bar.update(1)
                at_sync = self.step_in_epoch % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch
                if at_sync or (not d.enabled and self.stop.requested):
                    stop = self._check()  # syncs the device: the moment to read the clock
                    now = time.perf_counter()
                    if bar is not None and at_sync:
                        loss_sum = self.sums[0].item()
                        steps = max(1, window_images // (self.local_batch * d.world))
                        bar.set_postfix(loss=f"{(loss_sum - window_sum) / steps:.3f}",
                                        img_s=f"{window_images / max(now - window_start, 1e-9):.0f}")
                        window_sum = loss_sum
                    self.epoch_images += window_images
                    window_start, window_images = now, 0
                    if stop:
                        self.epoch_seconds += now - start
                        self._save()
                        raise TrainingInterrupted(self.path, self.epoch, self.step_in_epoch)
        finally:
            if bar is not None:
                bar.close()
        self.epoch_seconds += time.perf_counter() - start

    def _end_epoch(self) -> None:
        cfg, d = self.config, self.d
        self._check()
        _average_buffers(self.model, d)
        acc = {role: self._val_accuracy(arch) for role, arch in (("largest", self.largest),
                                                                 ("smallest", self.smallest))}
        why = _collapse(self.history, acc["largest"], self.space.num_classes, cfg.collapse_drop)
        if why:
            kept = f"the last good checkpoint {self.path} (epoch {self._saved_epoch()}) is kept" \
                if self.path.exists() else "no checkpoint was written"
            raise TrainingError(f"accuracy collapse in epoch {self.epoch + 1}: the largest subnet's validation "
                                f"accuracy {why}; {kept}; lower --lr or set --grad-clip")
        sums = self.sums.tolist()
        steps = max(1, self.step_in_epoch)
        row = {"epoch": self.epoch + 1, "loss": sums[0] / steps, "kd_loss": sums[1] / steps,
               "val_acc_largest": acc["largest"], "val_acc_smallest": acc["smallest"],
               "lr": self.schedule.lr(max(0, self.global_step - 1)),
               "images_per_s": self.epoch_images / max(self.epoch_seconds, 1e-9), "seconds": self.epoch_seconds}
        self.history.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums.zero_()
        self.epoch_seconds, self.epoch_images = 0.0, 0
        self._save()
        if self.verbose:
            line = (f"epoch {row['epoch']}/{cfg.epochs}: loss {row['loss']:.4f}, kd {row['kd_loss']:.4f}, "
                    f"val largest {row['val_acc_largest']:.2f} %, smallest {row['val_acc_smallest']:.2f} %, "
                    f"lr {row['lr']:.4f}, {row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s")
            if self.progress:
                from tqdm.auto import tqdm

                tqdm.write(line)
            else:
                print(line, flush=True)
        info = self._info()
        for cb in self.callbacks:
            cb.on_epoch_end(info, row)

    def _val_accuracy(self, arch: Arch) -> float:
        """Validation accuracy (%) after BN re-estimation, sharded over ranks, the same on every rank."""
        cfg = self.config
        net = self.model.extract(arch)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        recalibrate_bn(net, calibration_batches(self.dataset.train, arch.resolution, batch_size=cfg.batch_size,
                                                n_batches=cfg.bn_batches, device=self.device, seed=cfg.seed,
                                                channels_last=self.channels_last))
        correct, total = evaluate(net, self.val, arch.resolution, device=self.device,
                                  batch_size=cfg.eval_batch_size, channels_last=self.channels_last)
        counts = _all_reduce(torch.tensor([correct, total], dtype=torch.float64, device=self.device), self.d)
        correct_all, total_all = counts.tolist()
        return 100.0 * correct_all / max(total_all, 1.0)


__all__ = ["Callback", "CosineSchedule", "StepInfo", "TrainConfig", "TrainingError", "TrainingInterrupted",
           "evaluate", "kd_loss", "make_optimizer", "subnet_accuracy", "train_supernet"]
