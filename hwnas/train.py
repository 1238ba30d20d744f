"""Supernet training: the sandwich rule with in-place distillation, resumable, single process or DDP.

Each step trains, on one batch, the largest subnet on the labels (with label smoothing), then
`num_sampled` subnets from a sampler and the smallest subnet on the largest's detached soft
outputs (in-place distillation, BigNAS): the gradients of all of them are summed and the
optimizer steps once. Every subnet runs at its own resolution (the batch is resized), the same on
every rank, because the sampler's seeded RNG is the same on every rank. Under torchrun the ranks
stay in step without DistributedDataParallel (`hwnas.distributed` says why and how).

Channels are not sorted (`Supernet.sort_channels`) at any point: OFA sorts them before it starts
training narrower widths of an already trained network. Here the narrow widths train from the
first step on the first N channels, which therefore already are the ones the narrow subnets need;
sorting by the widest subnet's importance would hand them other channels and undo their training.

Checkpoints (`hwnas.checkpoint`) are written atomically at the end of every epoch and at the next
step boundary after a SIGTERM; a NaN/inf loss or a collapse of validation accuracy stops training
with `TrainingError` before anything is saved, so the checkpoint on disk is the last good one; the
error says how to continue it (`recipe.recovery_advice`). A run starts by removing killed saves' temporary files.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from hwnas.callbacks import Callback, StepInfo
from hwnas.checkpoint import FORMAT, VERSION, load_checkpoint, remove_orphan_temps, save_checkpoint
from hwnas.data import Dataset
from hwnas.distributed import (
    Dist,
    all_reduce,
    average_buffers,
    average_gradients,
    broadcast_module,
    epoch_shard,
    gather_rng,
    init_distributed,
    restore_rng,
)
from hwnas.evaluation import calibration_batches, evaluate, resolve_device, subnet_accuracy
from hwnas.fileio import atomic_write_text
from hwnas.recipe import (
    CosineSchedule,
    ResolutionCache,
    TrainConfig,
    TrainingError,
    autocast,
    collapse_reason,
    epoch_seed,
    kd_loss,
    make_optimizer,
    recovery_advice,
    to_cpu,
)
from hwnas.sampling import UniformSampler, make_sampler
from hwnas.space import Arch, SearchSpace
from hwnas.supernet import Supernet, recalibrate_bn
from hwnas.time_budget import plan_epochs
from hwnas.train_resume import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    LOG_COLUMNS,
    LOG_NAME,
    StopRequest,
    TrainingInterrupted,
    check_resume,
    resume_field,
    sigterm_to,
    write_log,
)


def _bar_interval() -> float:
    """Seconds between bar redraws: often on a terminal, rarely into a log file (each redraw is a line there)."""
    return 0.2 if sys.stderr.isatty() else 10.0


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
    d, device = init_distributed(config.device)
    try:
        if time_budget is not None:
            if resume and path.exists():
                stored = load_checkpoint(path)["train_config"].get("epochs", config.epochs)
                config = dataclasses.replace(config, epochs=int(stored))
            else:
                def probe(cfg: TrainConfig) -> _Trainer:  # a throwaway trainer: it writes nothing
                    return _Trainer(space, dataset, cfg, Path("."), Path("."), d, device, [], progress=False)

                config = dataclasses.replace(config, epochs=plan_epochs(
                    probe, dataset, config, d, device, time_budget - (time.perf_counter() - started),
                    verbose and d.main))
        trainer = _Trainer(space, dataset, config, out_dir, path, d, device, list(callbacks), progress, verbose)
        return trainer.run(resume)
    finally:
        if d.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


class _Trainer:
    """The state of one run; `run` is the loop. Split out of `train_supernet` to keep each piece short."""

    def __init__(self, space: SearchSpace, dataset: Dataset, config: TrainConfig, out_dir: Path, path: Path,
                 d: Dist, device: torch.device, callbacks: list[Callback], progress: bool,
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
            fits = (len(dataset.train) // d.world) * d.world
            raise TrainingError(f"train config: batch_size {config.batch_size} is larger than the training "
                                f"split ({len(dataset.train)} images): pass a batch size of {fits} or less")
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
        self.val_images = len(val)  # on all ranks together: what the collapse check's noise is measured on
        self.stop = StopRequest()

    # -- state ---------------------------------------------------------------------------------------
    def _state(self, complete: bool) -> dict[str, Any]:
        rng = gather_rng(self.device, self.d)  # collective: every rank calls _state
        model_config = {k: v for k, v in self.model.config().items() if k != "space"}
        last = self.history[-1] if self.history else {}
        return {
            "format": FORMAT, "version": VERSION, "space": self.space.to_dict(), "supernet_config": model_config,
            "model": to_cpu(self.model.state_dict()), "train_config": self.config.to_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "complete": complete, "world_size": self.d.world,
            "optimizer": None if complete else to_cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "scheduler": {**self.schedule.state_dict(), "step": self.global_step},
            "sampler_rng": self.sampler.state_dict(), "torch_rng": rng,
            "epoch_progress": {"sums": to_cpu(self.sums), "seconds": self.epoch_seconds,
                               "images": self.epoch_images},
            "history": list(self.history), "dataset": self.dataset.spec,
            "val_size": len(self.dataset.val) if self.dataset.val_carved else None,  # search and export redraw it
            "metrics": {k: last[k] for k in ("val_acc_largest", "val_acc_smallest") if k in last},
        }

    def _save(self, complete: bool = False) -> None:
        state = self._state(complete)
        if self.d.main:
            save_checkpoint(self.path, state)
            write_log(self.out_dir / LOG_NAME, self.history)

    def _load(self) -> bool:
        """Restore a checkpoint; True when it is complete (nothing left to train)."""
        state = load_checkpoint(self.path, map_location="cpu")
        check_resume(self.path, state, self.space, self.dataset, self.config, say=self.d.main)
        if state.get("complete"):
            return True
        with resume_field(self.path, "model"):
            self.model.load_state_dict(state["model"])
        with resume_field(self.path, "optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        with resume_field(self.path, "sampler_rng"):
            self.sampler.load_state_dict(state["sampler_rng"])
        if state.get("scaler") is not None and self.scaler.is_enabled():
            with resume_field(self.path, "scaler"):
                self.scaler.load_state_dict(state["scaler"])
        with resume_field(self.path, "epoch"):
            self.epoch, self.step_in_epoch = int(state["epoch"]), int(state.get("step_in_epoch", 0))
            self.global_step = int(state.get("global_step", self.epoch * self.steps_per_epoch + self.step_in_epoch))
        with resume_field(self.path, "epoch_progress"):
            progress = state.get("epoch_progress") or {}
            if "sums" in progress:
                self.sums.copy_(progress["sums"])
            self.epoch_seconds = float(progress.get("seconds", 0.0))
            self.epoch_images = int(progress.get("images", 0))
        with resume_field(self.path, "history"):
            self.history = list(state.get("history", []))
        with resume_field(self.path, "torch_rng"):
            restore_rng(list(state.get("torch_rng", [])), self.device, self.d)
        return False

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, resume: bool) -> Path:
        if self.d.main:
            remove_orphan_temps(self.path)  # a save killed in an earlier run left its temporary file
        if self.path.exists() and not resume:
            raise TrainingError(f"{self.path} exists: pass --resume to continue it, or choose another --out")
        if resume and self.path.exists():
            if self._load():
                return self.path
        else:
            broadcast_module(self.model, self.d)
        if self.d.main:
            atomic_write_text(self.out_dir / CONFIG_NAME, json.dumps(
                {"space": self.space.name, "dataset": self.dataset.spec, "world_size": self.d.world,
                 "train_config": self.config.to_dict()}, indent=2) + "\n")
        with sigterm_to(self.stop):
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

    def _forward(self, arch: Arch, inputs: ResolutionCache) -> torch.Tensor:
        with autocast(self.device, self.config):
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

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One sandwich step on the batch (x, y), the optimizer step included."""
        cfg = self.config
        info = self._info()
        lr = self.schedule.lr(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        inputs = ResolutionCache(x, self.channels_last)

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
            return all_reduce(losses, self.d).tolist()

        for i in range(cfg.num_sampled):
            arch = self.sampler.sample(score)
            self._backward(info, f"sampled{i}", self._student_loss(self._forward(arch, inputs), teacher, y))
        loss = self._student_loss(self._forward(self.smallest, inputs), teacher, y)
        self._backward(info, "smallest", loss)
        self.sums[1] += loss.detach()

        average_gradients(self.params, self.d)
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def check(self) -> bool:
        """The synchronisation point: raise on a non-finite loss; True if some rank got SIGTERM."""
        flags = torch.cat([self.nonfinite, torch.tensor([1.0 if self.stop.requested else 0.0],
                                                        device=self.device)])
        values = all_reduce(flags, self.d, tdist.ReduceOp.MAX if self.d.enabled else None).tolist()
        bad = [role for role, v in zip(self.roles, values[:-1], strict=True) if v > 0]
        if bad:
            raise TrainingError(f"non-finite loss of the {', '.join(bad)} subnet(s) in epoch {self.epoch + 1} "
                                f"by step {self.step_in_epoch}; {self._kept()}; "
                                f"{recovery_advice(self.config, '--resume --grad-clip 1')}")
        return values[-1] > 0

    def _saved_epoch(self) -> int:
        return len(self.history)

    def _kept(self) -> str:
        """What a stopped run leaves: the last good checkpoint, or none."""
        if self.path.exists():
            return f"the last good checkpoint {self.path} (epoch {self._saved_epoch()}) is kept"
        return "no checkpoint was written yet"

    def _train_epoch(self) -> None:
        cfg, d = self.config, self.d
        shard = epoch_shard(self.dataset.train, self.epoch, cfg.seed, d)
        batches = shard.batches(self.local_batch, shuffle=False, seed=epoch_seed(cfg.seed, self.epoch, d.rank),
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
                self.step(x, y)
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
                    stop = self.check()  # syncs the device: the moment to read the clock
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
        self.check()
        average_buffers(self.model, d)
        acc = {role: self.val_accuracy(arch) for role, arch in (("largest", self.largest),
                                                                 ("smallest", self.smallest))}
        why = collapse_reason(self.history, acc["largest"], self.space.num_classes, cfg.collapse_drop,
                              self.val_images)
        if why:
            raise TrainingError(f"accuracy collapse in epoch {self.epoch + 1}: the largest subnet's validation "
                                f"accuracy {why}; {self._kept()}; "
                                f"{recovery_advice(cfg, '--resume --no-collapse-check', 'if the fall is noise')}")
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

    def val_accuracy(self, arch: Arch) -> float:
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
        counts = all_reduce(torch.tensor([correct, total], dtype=torch.float64, device=self.device), self.d)
        correct_all, total_all = counts.tolist()
        return 100.0 * correct_all / max(total_all, 1.0)


__all__ = ["CHECKPOINT_NAME", "CONFIG_NAME", "LOG_COLUMNS", "LOG_NAME", "Callback", "CosineSchedule", "StepInfo",
           "TrainConfig", "TrainingError", "TrainingInterrupted", "kd_loss", "make_optimizer", "train_supernet",
           # evaluation's, still importable from here for callers that have not moved to hwnas.evaluation
           "calibration_batches", "evaluate", "resolve_device", "subnet_accuracy"]
