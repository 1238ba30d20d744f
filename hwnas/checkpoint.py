"""Supernet checkpoints: written atomically, read back with a one-line error naming the file and field.

A checkpoint is one `torch.save`d dict that carries everything needed to rebuild the supernet
(the search space's spec and the supernet's config) and to continue training on the same
trajectory (optimizer, schedule, sampler and torch RNG states, epoch, step). It is read with
`weights_only=True`, so loading a file from elsewhere runs no pickled code. A supernet whose weights
hold a NaN or an infinity is refused on load: searched, it would "succeed" at chance accuracy.

A save holds an exclusive `flock` on the checkpoint's directory while it writes its temporary
file, so a temporary file found when the lock is free belongs to a writer that is gone (killed
mid-save: the kernel drops the lock with the process); `remove_orphan_temps` removes those, and
every save does so first. A save that fails (a full disk) is one `OutputError` naming the file;
the checkpoint on disk is then the previous one, untouched.

    {"format": "hwnas-supernet", "version": 1, "space": space.to_dict(), "supernet_config": {...},
     "model": state_dict, "train_config": {...}, "epoch": int, "step": int, "optimizer": ... | None,
     "scheduler": {...}, "sampler_rng": {...}, "torch_rng": [...], "history": [{...}, ...],
     "dataset": "fashion-mnist", "metrics": {...}}
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hwnas.errors import CheckpointError, OutputError
from hwnas.fileio import atomic_open, display_path
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
    The directory's lock is held meanwhile, so the temporary files of killed saves are removed
    first (`remove_orphan_temps`). A write that fails (a full disk, a file-size limit) raises
    `OutputError` naming the file; the previous checkpoint stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _directory_lock(path.parent, wait=True) as locked:
        if locked:
            _remove_temps(path)
        try:
            with atomic_open(path) as f:
                torch.save(dict(state), f)
        except (OSError, RuntimeError) as exc:
            reason = write_failure(exc)
            if reason is None:
                raise
            kept = f"{path.name} there is the previous one, unchanged" if path.exists() else "nothing was written"
            raise OutputError(f"{display_path(path)}: cannot write the checkpoint ({reason}); {kept}") from None
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


def write_failure(exc: BaseException) -> str | None:
    """What the OS said when `torch.save` could not write (ENOSPC, EFBIG, EIO, ...), or None for another error.

    torch's writer reports a failed write as `RuntimeError: [enforce fail at inline_container.cc:...] unexpected
    pos ...`, with the OSError of the file object it wrote to as the context (or the OSError itself surfaces
    when the last buffer is flushed); the OS's reason is what a user can act on.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError):
            return cause.strerror or str(cause) or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if "inline_container" in text or "PytorchStreamWriter" in text or "file write failed" in text:
        return f"the write failed, is the disk full? (torch: {text.splitlines()[0][:120]})"
    return None


def remove_orphan_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files that killed saves of checkpoint `path` left (`.NAME.*.tmp`); returns them.

    Only while no save in that directory holds its lock: a temporary file is then an orphan, its writer
    gone. Where the lock is taken (another save is under way) or the filesystem has no `flock`, nothing
    is removed. Training calls this as it starts; every save calls it too.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    with _directory_lock(path.parent, wait=False) as locked:
        return _remove_temps(path) if locked else []


def _remove_temps(path: Path) -> list[Path]:
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def _directory_lock(directory: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive `flock` on `directory` for the block; yields whether it is held (False: another process holds
    it and `wait` is False, or this platform or filesystem has no flock). Released when the block ends or the
    process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, so no orphan is ever judged gone
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        locked = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            locked = True
        except OSError:
            pass
        yield locked
    finally:
        os.close(fd)


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


def nonfinite_tensor(tensors: Mapping[str, torch.Tensor]) -> str:
    """'' when every floating-point tensor (parameter or buffer) is finite, else which is the first that is not."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return ""
    first = tensors[bad[0]]
    kind = "NaN" if bool(torch.isnan(first).any()) else "infinite"
    share = int((~torch.isfinite(first)).sum())
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    return f"'{bad[0]}' holds {share} {kind} value(s) of {first.numel()}{more}"


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
    bad = nonfinite_tensor(state["model"])
    if bad:
        raise CheckpointError(f"{path}: checkpoint field 'model' is not finite: {bad}; the run that wrote it "
                              "diverged (use an earlier checkpoint, or train again with a lower --lr)")
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
