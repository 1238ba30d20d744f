"""Supernet checkpoints: written atomically, read back with a one-line error naming the file and field.

A checkpoint is one `torch.save`d dict that carries everything needed to rebuild the supernet
(the search space's spec and the supernet's config) and to continue training on the same
trajectory (optimizer, schedule, sampler and torch RNG states, epoch, step). It is read with
`weights_only=True`, so loading a file from elsewhere runs no pickled code.

    {"format": "hwnas-supernet", "version": 1, "space": space.to_dict(), "supernet_config": {...},
     "model": state_dict, "train_config": {...}, "epoch": int, "step": int, "optimizer": ... | None,
     "scheduler": {...}, "sampler_rng": {...}, "torch_rng": [...], "history": [{...}, ...],
     "dataset": "fashion-mnist", "metrics": {...}}
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hwnas.errors import CheckpointError
from hwnas.fileio import atomic_open
from hwnas.space import SearchSpace

if TYPE_CHECKING:
    from hwnas.supernet import Supernet

FORMAT = "hwnas-supernet"
VERSION = 1
# field -> the type it must have; the rest of the fields are optional (older or slimmer files)
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "version": int,
    "space": dict,
    "supernet_config": dict,
    "model": dict,
    "train_config": dict,
    "epoch": int,
}


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file in the same directory, fsync, then rename.

    A reader (or a crash, or a SIGKILL halfway) sees either the previous checkpoint or the new
    one, never a half-written file; the rename is atomic because both names are on one filesystem.
    """
    path = Path(path)
    with atomic_open(path) as f:
        torch.save(dict(state), f)
    try:  # make the rename itself durable; not every filesystem lets a directory be opened
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def why_unreadable(exc: BaseException) -> str:
    """torch's reason in one clause: its messages run to paragraphs of advice (weights_only=False, safe
    globals) that a user of the CLI cannot act on, sometimes with terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unpickler:
        return f"not a plain-tensor torch file: {unpickler.group(1).split('. ')[0].strip()}"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.split(". ")[0][:200]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; CheckpointError names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise CheckpointError(f"{path}: not a readable hwnas checkpoint (truncated or another format: "
                              f"{why_unreadable(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not an hwnas supernet checkpoint (field 'format' is {found!r}, "
                              f"expected {FORMAT!r})")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in state:
            raise CheckpointError(f"{path}: checkpoint is missing field '{name}'")
        if not isinstance(state[name], kind) or isinstance(state[name], bool):
            raise CheckpointError(f"{path}: checkpoint field '{name}' has type {type(state[name]).__name__}")
    if state["version"] > VERSION:
        raise CheckpointError(f"{path}: checkpoint field 'version' is {state['version']}; this hwnas reads "
                              f"version {VERSION} and older (upgrade hwnas)")
    bad = [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: checkpoint field 'model' holds a non-tensor entry '{bad[0]}'")
    return state


def checkpoint_space(path: str | Path, state: Mapping[str, Any]) -> SearchSpace:
    """The search space stored in a checkpoint, rebuilt from its spec."""
    try:
        return SearchSpace.from_dict(state["space"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint field 'space' is not a valid space spec ({exc})") from None


def load_supernet(path: str | Path, *, space_name: str | None = None,
                  map_location: str | torch.device = "cpu") -> tuple[Supernet, dict[str, Any]]:
    """Rebuild the supernet of a checkpoint and load its weights; returns (supernet, checkpoint dict).

    The space is rebuilt from the spec stored in the file, not looked up by name, so a preset
    that changed since training cannot silently reshape the weights. `space_name`, when given,
    is the space the caller expects: another one is refused.
    """
    from hwnas.supernet import Supernet

    state = load_checkpoint(path, map_location=map_location)
    space = checkpoint_space(path, state)
    if space_name is not None and space.name != space_name:
        raise CheckpointError(f"checkpoint {path} was trained on space '{space.name}', not '{space_name}'")
    config = state["supernet_config"]
    net = Supernet(space, kernel_transform=bool(config.get("kernel_transform", False)))
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{path}: checkpoint field 'model' does not fit space '{space.name}' "
                              f"({detail[:300]})") from None
    device = torch.device(map_location) if isinstance(map_location, str) else map_location
    return net.to(device).eval(), state
