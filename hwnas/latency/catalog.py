"""Which latency table to use on this device: a committed one whose fingerprint matches, else one profiled now.

Tables are looked up in `table_dirs()`: the folders in `$HWNAS_TABLES` (os.pathsep-separated), then
`./latency_tables`, then the tables installed with hwnas (`<prefix>/share/hwnas/latency_tables`) and,
when hwnas runs from a source checkout, the checkout's own `latency_tables/`. A table is only
reused when it was measured for this space and profile on a device whose fingerprint matches
this one; otherwise the space is profiled here (resumably) into the caller's folder.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hwnas.errors import LatencyTableError
from hwnas.fileio import display_path
from hwnas.latency.device import device_slug, fingerprint
from hwnas.latency.profiler import profile_space, table_path
from hwnas.latency.quiet import QuietGuard
from hwnas.latency.table import LatencyTable
from hwnas.space import SearchSpace

TABLES_ENV = "HWNAS_TABLES"


def table_dirs() -> list[Path]:
    """Where committed tables are looked for, first match first (see the module doc)."""
    dirs = [Path(d) for d in os.environ.get(TABLES_ENV, "").split(os.pathsep) if d]
    dirs += [Path.cwd() / "latency_tables", Path(sys.prefix) / "share" / "hwnas" / "latency_tables"]
    checkout = Path(__file__).resolve().parents[2] / "latency_tables"
    if (checkout.parent / "pyproject.toml").is_file():
        dirs.append(checkout)
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def find_table(space: SearchSpace, profile: Any, fp: dict[str, Any] | None = None,
               dirs: list[Path] | None = None) -> tuple[LatencyTable | None, list[str]]:
    """The first table in `dirs` measured for `space` and `profile` on this device, with its soft
    differences (library versions, ...); None and why each candidate was refused when none matches."""
    fp = fp if fp is not None else fingerprint(profile)
    slug = device_slug(fp)
    refused: list[str] = []
    for root in dirs if dirs is not None else table_dirs():
        path = table_path(root, space, profile, slug)
        if not path.is_file():
            continue
        try:
            table = LatencyTable.load(path)
            return table, table.check_target(space, profile, fp)
        except LatencyTableError as exc:
            refused.append(str(exc))
    return None, refused


def table_for_device(space: SearchSpace, profile: Any, out_dir: str | Path, *, progress: bool = False,
                     log: Callable[[str], None] = print, guard: QuietGuard | None = None) -> tuple[LatencyTable, bool]:
    """A table for this device: a committed one that matches, else `space` profiled now into OUT_DIR/latency_tables
    (resumed if a killed run left one). Returns the table and whether it was committed (reused)."""
    fp = fingerprint(profile)
    table, notes = find_table(space, profile, fp)
    if table is not None:
        shown = display_path(table.path) if table.path is not None else "the table"
        log(f"  reused {shown} (fingerprint matches{'; ' + '; '.join(notes) if notes else ''})")
        return table, True
    for why in notes:
        log(f"  committed table not used: {why}")
    started = time.perf_counter()
    log(f"  no table for this device ({device_slug(fp)}) and profile: profiling {space.name} now (about a minute)")
    path = profile_space(space, profile, Path(out_dir) / "latency_tables", resume=True, progress=progress, guard=guard)
    log(f"  profiled here in {time.perf_counter() - started:.0f} s: {display_path(path)}")
    return LatencyTable.load(path), False


__all__ = ["TABLES_ENV", "find_table", "table_dirs", "table_for_device"]
