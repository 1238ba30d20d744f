"""The files of a latency table: the CSV's columns, the metadata's fields, and their checked readers.

`<device-slug>__<profile>.csv` holds one row per block key (COLUMNS, and OPTIONAL_COLUMNS where
kept); `<same>.meta.json` beside it holds META_FIELDS (and provenance: date, hwnas version, commit).
A file that is missing a field or holds a malformed value is a LatencyTableError naming the file and
the field, never a crash at the first prediction. `<same>.lock` exists while a profiler writes the
table (`table_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.errors import LatencyTableError
from hwnas.fileio import display_path

FORMAT_VERSION = 1
KINDS = ("stem", "first", "mbconv", "head")  # BlockSpec kinds: the values of the column 'kind'
COLUMNS = ("key", "kind", "median_ms", "p10_ms", "p90_ms", "n")
OPTIONAL_COLUMNS = ("mean_ms", "min_ms", "rounds", "others_busy")
META_FIELDS = ("format_version", "space", "profile", "fingerprint", "device_slug", "calibration")


def meta_path_for(csv_path: str | Path) -> Path:
    """The metadata file beside a table's CSV."""
    path = Path(csv_path)
    return path.with_name(path.name.removesuffix(".csv") + ".meta.json")


def lock_path_for(csv_path: str | Path) -> Path:
    """The lock file beside a table's CSV, held while a profiler writes the table."""
    path = Path(csv_path)
    return path.with_name(path.name.removesuffix(".csv") + ".lock")


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote into the lock file ("pid unknown" in the instant before it wrote it)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


@contextlib.contextmanager
def table_lock(csv_path: str | Path, *, wait: bool = False,
               on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the sidecar lock `<table>.lock` while the block writes the table at `csv_path`.

    Two profilers writing one table would each rewrite the other's rows. The lock is `fcntl.flock` on
    the sidecar file, so the kernel drops it when its process dies: a killed run leaves at most a
    file that no one holds, never a stale lock that blocks the next run. Held elsewhere, the lock is
    refused at once in one line naming the table and the holder's pid, or with `wait` waited for
    (`on_wait` is told the holder first). The file is removed on the way out, while still held;
    whoever was waiting then finds its file unlinked and locks the one at the path instead.
    """
    lock = lock_path_for(csv_path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise LatencyTableError(
                        f"{display_path(csv_path)}: another hwnas profile ({holder}) is writing this table "
                        f"(lock {lock.name}); wait for it to finish, or pass --wait-lock (wait_lock=True) to "
                        "wait for it") from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            here = os.fstat(fd)
            try:
                there = os.stat(lock)
            except FileNotFoundError:
                there = None
        except BaseException:
            os.close(fd)
            raise
        if there is not None and (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino):
            break
        os.close(fd)  # the holder removed the file we waited on: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def read_meta(meta_path: Path) -> dict[str, Any]:
    """The metadata of a table, checked field by field; a LatencyTableError names the file and the field."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise LatencyTableError(f"{meta_path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise LatencyTableError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise LatencyTableError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    for name in META_FIELDS:
        if name not in meta:
            raise LatencyTableError(f"{meta_path}: missing field '{name}'")
    if meta["format_version"] != FORMAT_VERSION:
        raise LatencyTableError(f"{meta_path}: field 'format_version' is {meta['format_version']!r}; "
                                f"this hwnas reads version {FORMAT_VERSION}")
    if not isinstance(meta["space"], dict) or "name" not in meta["space"]:
        raise LatencyTableError(f"{meta_path}: field 'space' must be a space spec with a 'name'")
    if meta["profile"] is not None and not isinstance(meta["profile"], dict):
        raise LatencyTableError(f"{meta_path}: field 'profile' must be an object or null")
    if not isinstance(meta["fingerprint"], dict):
        raise LatencyTableError(f"{meta_path}: field 'fingerprint' must be an object")
    cal = meta["calibration"]
    if not isinstance(cal, dict) or "kind" not in cal or not isinstance(cal.get("coefficients"), dict):
        raise LatencyTableError(f"{meta_path}: field 'calibration' must hold 'kind' and 'coefficients'")
    coeffs = cal["coefficients"]
    for name in ("intercept", "scale", "per_block"):
        if name not in coeffs:
            raise LatencyTableError(f"{meta_path}: missing field 'calibration.coefficients.{name}'")
    numbers = [("intercept", coeffs["intercept"])]
    for group in ("scale", "per_block"):
        if not isinstance(coeffs[group], dict):
            raise LatencyTableError(f"{meta_path}: field 'calibration.coefficients.{group}' must be an object")
        numbers += [(f"{group}.{k}", v) for k, v in coeffs[group].items()]
    for name, value in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LatencyTableError(f"{meta_path}: field 'calibration.coefficients.{name}' is not a number "
                                    f"({value!r})")
    if any(v <= 0 for v in coeffs["scale"].values()):
        raise LatencyTableError(f"{meta_path}: field 'calibration.coefficients.scale' must be positive")
    return meta


def read_rows(path: Path) -> pd.DataFrame:
    """The rows of a table, checked column by column; a LatencyTableError names the file, line and key."""
    try:
        rows = pd.read_csv(path, dtype={"key": str, "kind": str}, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise LatencyTableError(f"{path}: empty file (no header)") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise LatencyTableError(f"{path}: not a readable CSV ({exc})") from None
    for column in COLUMNS:
        if column not in rows.columns:
            raise LatencyTableError(f"{path}: missing column '{column}'")
    for column in (*COLUMNS[2:], *[c for c in OPTIONAL_COLUMNS if c in rows.columns]):
        values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
        if column in COLUMNS:
            bad = ~np.isfinite(values) | (values < 0)
        else:  # optional statistics may be empty (not kept), but not garbage
            bad = (np.isnan(values) & rows[column].notna().to_numpy()) | np.isinf(values) | (values < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise LatencyTableError(f"{path}: column '{column}' has a non-numeric or negative value "
                                    f"{rows[column].iloc[i]!r} (line {i + 2}, key {rows['key'].iloc[i]!r})")
        rows[column] = values.astype("int64" if column == "n" else "float64")
    if rows["key"].isna().any():
        line = int(rows["key"].isna().to_numpy().argmax()) + 2
        raise LatencyTableError(f"{path}: column 'key' has an empty value (line {line})")
    bad_kind = ~rows["kind"].isin(KINDS)
    if bad_kind.any():
        i = int(np.flatnonzero(bad_kind.to_numpy())[0])
        raise LatencyTableError(f"{path}: column 'kind' has unknown value {rows['kind'].iloc[i]!r} "
                                f"(line {i + 2}); known: {', '.join(KINDS)}")
    dup = rows["key"].duplicated()
    if dup.any():
        raise LatencyTableError(f"{path}: key {rows['key'][dup].iloc[0]!r} appears twice")
    return rows
