"""Files on disk: atomic writes (every file hwnas leaves behind is the old one or the whole new one), and how paths
are shown.

Profiling and training are long and may be killed at any moment; a reader (or a resumed run) must
never find half a table or half a log. Kept free of torch so that the latency tables and the
searchers can use it without importing torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def file_mode() -> int:
    """The mode open() would give a new file (mkstemp makes it 0600, private to its owner)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` only once the block ends without an error.

    A temporary file in the same directory (so the rename is atomic), given the mode open() would
    give, fsynced, then renamed over `path`; on any exception, a kill included, it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_open`."""
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of the UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def display_path(path: str | Path) -> str:
    """`path` as hwnas prints it: relative to the working directory where it lies below it (short, and not this
    machine's absolute layout in a transcript someone else reads), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def recorded_path(path: str | Path, folder: str | Path) -> str:
    """`path` as a file written in `folder` records it: relative to `folder`, never this machine's absolute layout.

    A run record, a report or a table travels between machines and people with the files it names;
    a path relative to itself still points at them after the whole tree is copied or checked out
    elsewhere. `resolve_recorded` reads it back.
    """
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def resolve_recorded(value: str | Path, folder: str | Path) -> Path:
    """A path a file in `folder` recorded: relative to `folder` (what `recorded_path` writes), or, for records
    written before paths were relative, as given (relative to the working directory) when only that exists."""
    value = Path(value)
    if value.is_absolute():
        return value
    beside = Path(folder) / value
    return beside if beside.exists() or not value.exists() else value


MIN_FREE_BYTES = 64 << 20  # what a search's or an export's files take, with room: a full disk is refused up front


def check_output_dir(path: str | Path, what: str = "--out", *, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """`path` as a directory hwnas can write into, checked before any long work starts; else one `OutputError`.

    A search or a training that runs for minutes and then finds that `--out` is a file, sits under a
    file, lies on a read-only or virtual filesystem (`/proc`), or on a disk with less than
    `min_free_bytes` free (`os.statvfs`), loses all of it. Nothing is created: the nearest existing
    ancestor is probed with a temporary directory that is removed at once.
    """
    from hwnas.errors import OutputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {display_path(path)} is a file, not a directory: choose another path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {display_path(path)} lies under {display_path(probe)}, which is a file, not a "
                          "directory")
    try:
        created = tempfile.mkdtemp(prefix=".hwnas-probe-", dir=probe)
    except OSError as exc:
        raise OutputError(f"{what} {display_path(path)}: cannot write in {display_path(probe)} "
                          f"({exc.strerror or exc})") from None
    with contextlib.suppress(OSError):
        os.rmdir(created)
    stats = os.statvfs(probe)
    free = stats.f_bavail * stats.f_frsize
    if free < min_free_bytes:
        raise OutputError(f"{what} {display_path(path)}: only {free / 2**20:.1f} MiB free on its disk, "
                          f"{min_free_bytes / 2**20:.0f} MiB needed: free some space or choose another disk")
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (checkpoints and engines are hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
