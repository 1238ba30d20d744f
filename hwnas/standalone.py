"""Training one arch alone, from scratch: the baseline that inherited supernet weights are compared with.

Same optimizer, schedule, augmentation, epochs and initialisation as the supernet's recipe, one
static network at `arch.resolution`, single process (benchmarks/supernet_quality.py runs one per
torchrun rank). On a CPU the largest mbv3-32 subnet takes hours for 30 epochs, longer than a
working session, so with `state_path` the run saves itself atomically after every epoch and a
later call picks it up where it stopped: a kill loses at most the epoch under way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.checkpoint import why_unreadable
from hwnas.data import Dataset
from hwnas.evaluation import resolve_device
from hwnas.fileio import atomic_open
from hwnas.recipe import (
    CosineSchedule,
    ResolutionCache,
    TrainConfig,
    TrainingError,
    autocast,
    epoch_seed,
    make_optimizer,
    to_cpu,
)
from hwnas.space import Arch, SearchSpace

STATE_FORMAT = "hwnas-standalone-state"


def _recipe(config: TrainConfig) -> dict[str, Any]:
    """What must match for a saved state to continue: the recipe, not where it runs."""
    return {**config.to_dict(), "device": None}


def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                arch: Arch, config: TrainConfig, epoch: int, step: int, seconds: float, device: torch.device) -> None:
    state = {"format": STATE_FORMAT, "arch": arch.to_dict(), "recipe": _recipe(config), "epoch": epoch,
             "step": step, "seconds": seconds, "model": to_cpu(model.state_dict()),
             "optimizer": to_cpu(optimizer.state_dict()),
             "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    with atomic_open(path) as handle:
        torch.save(state, handle)


def _load_state(path: Path, arch: Arch, config: TrainConfig) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise TrainingError(f"{path}: not a readable stand-alone training state ({why_unreadable(exc)}); "
                            "delete it to train from scratch") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path}: not a stand-alone training state (field 'format'); delete it or choose "
                            "another output folder")
    if state.get("arch") != arch.to_dict():
        raise TrainingError(f"{path}: saved for another arch (field 'arch'); delete it to train {arch.arch_id}")
    saved = state.get("recipe")
    if not isinstance(saved, dict) or saved != _recipe(config):
        differ = sorted(k for k in _recipe(config) if not isinstance(saved, dict) or saved.get(k) != _recipe(config)[k])
        raise TrainingError(f"{path}: saved with another recipe (field 'recipe': {', '.join(differ) or 'its keys'} "
                            "differ); delete it to train with this one")
    for name, kind in (("epoch", int), ("step", int), ("model", dict), ("optimizer", dict), ("scaler", dict),
                       ("torch_rng", torch.Tensor)):
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise TrainingError(f"{path}: field '{name}' is missing or of type {type(state.get(name)).__name__}; "
                                "delete it to train from scratch")
    return state


def _restore(path: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, device: torch.device) -> None:
    name = "model"
    try:
        model.load_state_dict(state["model"])
        name = "optimizer"
        optimizer.load_state_dict(state["optimizer"])
        name = "scaler"
        scaler.load_state_dict(state["scaler"])
        name = "torch_rng"
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and isinstance(state.get("cuda_rng"), torch.Tensor):
            name = "cuda_rng"
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path}: cannot resume from field '{name}' ({reason[:200]}); delete it to train "
                            "from scratch") from None


def saved_progress(state_path: str | Path) -> tuple[int, float] | None:
    """(epochs done, seconds spent) of a saved stand-alone state, or None where there is none to read."""
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        return int(state["epoch"]), float(state.get("seconds", 0.0))
    except Exception:  # absent or unreadable: train_standalone itself says what is wrong with it
        return None


def train_standalone(space: SearchSpace, arch: Arch, dataset: Dataset, config: TrainConfig, *,
                     progress: bool = False, state_path: str | Path | None = None) -> nn.Sequential:
    """Train `arch` alone from scratch, as a static network, with the same recipe (plain CE, label smoothing).

    With `state_path`, the state is saved there after every epoch and an existing state (same
    arch, same recipe) is continued on the same trajectory: the model, optimizer, step and RNG
    state are restored, and each epoch's data order depends only on the seed and the epoch.
    The caller removes the file once it has kept the result.
    """
    from hwnas.blocks import build_network
    from hwnas.depthwise import fast_depthwise
    from hwnas.supernet.ops import init_weights

    config.check()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_network(space.blocks(arch), space.se_ratio, space.dropout)
    init_weights(model, zero_last_gamma=True)
    model = model.to(device)
    channels_last = config.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    steps = len(dataset.train) // config.batch_size
    if config.steps_per_epoch is not None:
        steps = min(steps, config.steps_per_epoch)
    if steps < 1:
        raise TrainingError(f"train config: batch_size {config.batch_size} is larger than the training split")
    schedule = CosineSchedule(config.lr, config.epochs * steps, round(config.warmup_epochs * steps),
                              config.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.amp and config.amp_dtype == "fp16")
    first_epoch, step, seconds = 0, 0, 0.0
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        state = _load_state(path, arch, config)
        _restore(path, state, model, optimizer, scaler, device)
        first_epoch, step, seconds = state["epoch"], state["step"], float(state.get("seconds", 0.0))
    started = time.perf_counter()
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs * steps, initial=step, leave=False, dynamic_ncols=True,
                   desc=f"scratch {arch.arch_id}")
    try:
        with fast_depthwise(model):  # the same function; the CPU's slow depthwise weight gradient avoided
            for epoch in range(first_epoch, config.epochs):
                batches = dataset.train.batches(config.batch_size, shuffle=True,
                                                seed=epoch_seed(config.seed, epoch, 0), augment=config.augment,
                                                drop_last=True, device=device, max_batches=steps)
                for x, y in batches:
                    for group in optimizer.param_groups:
                        group["lr"] = schedule.lr(step)
                    optimizer.zero_grad(set_to_none=True)
                    inputs = ResolutionCache(x, channels_last)
                    with autocast(device, config):
                        logits = model(inputs.at(arch.resolution))
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                    scaler.scale(loss).backward()
                    if config.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    if bar is not None:
                        bar.update(1)
                if path is not None:
                    _save_state(path, model, optimizer, scaler, arch, config, epoch + 1, step,
                                seconds + time.perf_counter() - started, device)
    finally:
        if bar is not None:
            bar.close()
    return model.to(memory_format=torch.contiguous_format)


__all__ = ["STATE_FORMAT", "saved_progress", "train_standalone"]
