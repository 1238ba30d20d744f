"""The profiler: time every unique block of a space on a backend and write the latency table.

Rows are written as they are measured (CSV rewritten atomically after each chunk), so a killed run
loses at most the chunk in flight and `resume` carries on where it stopped. Blocks are timed in
interleaved rounds: a burst of load from another process lands on one round of a few blocks, and
keeping the quietest round drops it, where a single long run would carry it into the table. Whole
subnets (for the calibration, and in validation) are timed the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.blocks import build_block, build_network
from hwnas.errors import HwnasError, LatencyTableError
from hwnas.fileio import atomic_write_text, check_output_dir, display_path
from hwnas.latency.quiet import QuietGuard
from hwnas.latency.table import LatencyTable
from hwnas.latency.table_files import table_lock
from hwnas.latency.target import profile_command, shape_differs
from hwnas.space import Arch, BlockSpec, SearchSpace

CHUNK = 32  # blocks timed together in interleaved rounds (a round lasts about a second), and written together
SUBNET_CHUNK = 16  # whole subnets timed together
MAX_ROUNDS = 8
AGREE = 0.02
CALIBRATION_COLUMNS = ("arch_id", "arch", "raw_ms", "median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "n")
TIMING_EXTRAS = ("rounds", "others_busy")  # kept where measured (tables from before have no such columns)


def preset_shape(name: str) -> tuple[int, int] | None:
    """(in_channels, num_classes) of the registered space `name` as built with no overrides; None when `name` is
    not registered (a `package.module:factory` space, or one made in Python) or its factory needs arguments."""
    from hwnas import spaces

    if name not in spaces.names():
        return None
    try:
        default = spaces.get(name)
    except Exception:  # a user's factory that cannot be built without arguments has no default shape
        return None
    if not isinstance(default, SearchSpace) or default.name != name:
        return None
    return default.in_channels, default.num_classes


def shape_suffix(space: SearchSpace) -> str:
    """`__in<C>-cls<K>` when `space` takes another input-channel or class count than its preset's default, else "".

    A space fitted to a dataset (`spaces.get('mbv3-32', in_channels=3, num_classes=4)`) has other stem
    and head blocks than the preset: its table must not take (or clash with) the default table's name,
    and the default-shaped name stays as it always was, so committed tables keep working.
    """
    default = preset_shape(space.name)
    if default is None or default == (space.in_channels, space.num_classes):
        return ""
    return f"__in{space.in_channels}-cls{space.num_classes}"


def table_path(out_dir: str | Path, space: SearchSpace, profile: Any, slug: str) -> Path:
    """`<out_dir>/<space>/<device-slug>__<profile>[__in<C>-cls<K>].csv`: one file per (space, shape, device,
    profile); the shape is in the name only where it is not the preset's default (`shape_suffix`)."""
    return Path(out_dir) / space.name / f"{slug}__{profile.name}{shape_suffix(space)}.csv"


def calibration_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".csv") + ".calibration.csv")


def resolve_profile(profile: Any) -> Any:
    """Accept a `DeviceProfile`, a profile name or a TOML path."""
    from hwnas.latency.profiles import DeviceProfile, load_profile

    return profile if isinstance(profile, DeviceProfile) else load_profile(profile)


def combine_timings(timings: Sequence[Any], statistic: str = "median", others_busy: float = math.nan) -> Any:
    """One `Timing` from several rounds: the round whose `statistic` is lowest, with all samples counted.

    Load from other processes only ever adds time, so the least disturbed round is the best estimate
    of what the device itself takes; on a quiet machine the rounds agree and this is their median.
    """
    from hwnas.latency.backends import Timing

    best = min(timings, key=lambda t: t.value(statistic))
    return Timing(median_ms=best.median_ms, p10_ms=best.p10_ms, p90_ms=best.p90_ms, mean_ms=best.mean_ms,
                  n=int(sum(t.n for t in timings)), min_ms=float(min(t.min_ms for t in timings)),
                  rounds=int(sum(t.rounds for t in timings)), others_busy=others_busy)


def confirmed(timings: Sequence[Any], statistic: str = "median", agree: float = AGREE) -> bool:
    """Whether the two quickest rounds agree within `agree`: the quick mode was seen twice, not once by luck."""
    values = sorted(t.value(statistic) for t in timings)
    return len(values) >= 2 and values[1] <= (1 + agree) * values[0]


def time_interleaved(backend: Any, items: Sequence[tuple[Any, tuple[int, int, int]]], rounds: int,
                     statistic: str = "median", *, max_rounds: int = MAX_ROUNDS, agree: float = AGREE,
                     guard: QuietGuard | None = None, what: str = "timing") -> list[Any]:
    """Time several modules in round-robin passes and keep each one's quickest round.

    At least `rounds` passes; then, up to `max_rounds`, more passes over the items whose two
    quickest rounds do not yet agree within `agree` (with `rounds` 1, one pass and no more): a
    quick mode seen twice, rather than once by luck or never. The extra passes cost time only where
    the rounds disagree. `benchmarks/timing_schedule.py` compares this with fixed schedules on the
    development VM; on its noisiest day no schedule tried repeated within 5 % for more than about
    two items in three, so the schedule narrows the noise but cannot remove a host's.
    With `guard`, the machine is checked quiet first (`QuietGuard.wait`) and the others' busy
    share over the passes is recorded with every timing (a busy machine is its policy's matter).
    """
    if guard is not None:
        guard.wait(what)
    per_item: list[list[Any]] = [[] for _ in items]
    todo = list(range(len(items)))
    with contextlib.ExitStack() as stack:
        busy = stack.enter_context(guard.measuring(what)) if guard is not None else []
        for done in range(max(max_rounds, rounds, 1)):
            for i in todo:
                module, shape = items[i]
                per_item[i].append(backend.time_module(module, shape))
            if rounds < 2:  # one pass asked for: nothing to confirm
                break
            if done + 1 >= rounds:
                todo = [i for i in todo if not confirmed(per_item[i], statistic, agree)]
                if not todo:
                    break
    others = busy[0].others if busy else math.nan
    return [combine_timings(t, statistic, others) for t in per_item]


def block_input_shape(spec: BlockSpec) -> tuple[int, int, int]:
    return (spec.cin, spec.in_size, spec.in_size)


def calibration_archs(space: SearchSpace, n: int, seed: int, exclude: set[str] | None = None) -> list[Arch]:
    """`n` distinct random subnets; the same list for the same seed, so a resumed run finds its own."""
    rng = np.random.default_rng(seed)
    exclude = exclude or set()
    archs: list[Arch] = []
    seen: set[str] = set()
    attempts = 0
    while len(archs) < n and attempts < 100 * max(n, 1):
        attempts += 1
        arch = space.sample(rng)
        if arch.arch_id in seen or arch.arch_id in exclude:
            continue
        seen.add(arch.arch_id)
        archs.append(arch)
    return archs


def measure_subnets(space: SearchSpace, archs: Sequence[Arch], backend: Any, *, rounds: int = 3,
                    statistic: str = "median", chunk: int = SUBNET_CHUNK,
                    on_chunk: Callable[[list[tuple[Arch, Any]]], None] | None = None,
                    progress: bool = False, desc: str = "subnets", guard: QuietGuard | None = None,
                    max_rounds: int = MAX_ROUNDS) -> list[tuple[Arch, Any]]:
    """Time whole subnets end to end (fresh weights: latency does not depend on their values)."""
    from tqdm import tqdm

    results: list[tuple[Arch, Any]] = []
    bar = tqdm(total=len(archs), desc=desc, unit="net", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(archs), chunk):
            group = archs[start:start + chunk]
            items = [(build_network(space.blocks(a), space.se_ratio).eval(), space.input_shape(a)) for a in group]
            timings = time_interleaved(backend, items, rounds, statistic, max_rounds=max_rounds, guard=guard,
                                       what=f"timing {desc} {start + 1}-{start + len(group)}")
            done = list(zip(group, timings, strict=True))
            results += done
            if on_chunk is not None:
                on_chunk(done)
            bar.update(len(group))
    finally:
        bar.close()
    return results


def _read_calibration(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=list(CALIBRATION_COLUMNS))
    try:
        rows = pd.read_csv(path, dtype={"arch_id": str, "arch": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LatencyTableError(f"{path}: not a readable CSV ({exc}); delete it to measure again") from None
    for column in CALIBRATION_COLUMNS:
        if column not in rows.columns:
            raise LatencyTableError(f"{path}: missing column '{column}'; delete it to measure again")
    return rows


def _start_table(path: Path, space: SearchSpace, profile: Any, fp: dict[str, Any], slug: str,
                 resume: bool) -> LatencyTable:
    cal_path = calibration_path(path)
    if resume and path.is_file():
        table = LatencyTable.load(path)
        identity, soft = table.target_differences(space, profile, fp)
        if identity and shape_differs(table.meta, space):  # this file is taken: a space without a preset's default
            raise LatencyTableError(f"{path}: cannot resume a table measured for another shape ({'; '.join(identity)})"
                                    f": `{profile_command(table.meta, space)} --out OTHER_DIR` builds this shape's "
                                    "table elsewhere, or --no-resume (resume=False) replaces this one")
        if identity:
            raise LatencyTableError(f"{path}: cannot resume a table measured for another target "
                                    f"({'; '.join(identity)}); start over with --no-resume (resume=False), "
                                    "or write elsewhere with --out")
        for diff in soft:
            warnings.warn(f"{path}: resuming a table measured with a difference: {diff}", stacklevel=3)
        return table
    cal_path.unlink(missing_ok=True)
    table = LatencyTable.new(space, profile, fp, slug, table_dir=path.parent)
    table.save(path)  # metadata with the fingerprint goes down before the first row
    return table


def _complete(table: LatencyTable, space: SearchSpace, path: Path, calibration_subnets: int, seed: int) -> bool:
    """Whether a resumed table already holds every block and the calibration asked for (fitted, not only
    measured): then there is nothing to measure, and rewriting its files would only change what it says."""
    if table.missing_keys(space):
        return False
    if calibration_subnets <= 0:
        return True
    wanted = {a.arch_id for a in calibration_archs(space, calibration_subnets, seed)}
    fitted = set(table.calibration.get("arch_ids") or ())
    return wanted <= fitted and wanted <= set(_read_calibration(calibration_path(path))["arch_id"])


@dataclass(frozen=True)
class ProfileRun:
    """What one `profile_table` call did: the table's path and what it measured (nothing for a complete table)."""

    path: Path
    blocks_measured: int  # in this call
    subnets_measured: int
    complete_before: bool  # the table was already complete: nothing was measured and no file was written
    blocks: int  # in the table
    subnets: int  # its calibration was fitted on

    def describe(self) -> str:
        """One line on what happened to the table."""
        if self.complete_before:
            return (f"{display_path(self.path)} is complete ({self.blocks} blocks, {self.subnets} calibration "
                    "subnets): nothing measured, nothing written")
        return (f"{display_path(self.path)}: {self.blocks_measured} blocks and {self.subnets_measured} calibration "
                f"subnets measured in this run ({self.blocks} blocks, {self.subnets} subnets in all)")


def profile_space(space: SearchSpace, profile: Any, out_dir: str | Path = "latency_tables", *, resume: bool = True,
                  calibration_subnets: int = 30, seed: int = 0, progress: bool = True, rounds: int = 3,
                  backend: Any = None, on_row: Callable[[BlockSpec, Any], None] | None = None,
                  guard: QuietGuard | None = None, max_rounds: int = MAX_ROUNDS, wait_lock: bool = False) -> Path:
    """Measure every block of `space` (stem and head included) and calibrate on whole subnets; the CSV path.

    `profile_table` with the same arguments (see there), printing to stderr, with `progress`, that a
    complete table was left as it is.
    """
    done = profile_table(space, profile, out_dir, resume=resume, calibration_subnets=calibration_subnets, seed=seed,
                         progress=progress, rounds=rounds, backend=backend, on_row=on_row, guard=guard,
                         max_rounds=max_rounds, wait_lock=wait_lock)
    if progress and done.complete_before:
        print(done.describe(), file=sys.stderr)
    return done.path


def profile_table(space: SearchSpace, profile: Any, out_dir: str | Path = "latency_tables", *, resume: bool = True,
                  calibration_subnets: int = 30, seed: int = 0, progress: bool = True, rounds: int = 3,
                  backend: Any = None, on_row: Callable[[BlockSpec, Any], None] | None = None,
                  guard: QuietGuard | None = None, max_rounds: int = MAX_ROUNDS, wait_lock: bool = False
                  ) -> ProfileRun:
    """Measure every block of `space` (stem and head included) and calibrate on whole subnets.

    The table goes to `table_path` (its name carries the space's shape where that is not the
    preset's). At least `rounds` interleaved passes per block, more (up to `max_rounds`) until its
    quickest two agree (`time_interleaved`); `on_row` is called after each block's row is on disk (a
    progress hook, also used to interrupt in tests). `guard` (a `QuietGuard`) waits for a quiet
    machine before each group of blocks, records how busy it was beside every row and in the
    metadata, and refuses (its policy) to write a group timed on a busy machine.

    With `resume`, a table of the same space, shape, profile and device carries on where it stopped;
    one that is already complete (every block, and the `calibration_subnets` asked for fitted) is
    left exactly as it is: nothing measured, no file written. The table is written under its
    sidecar lock (`table_lock`): another process writing it is refused at once, or with `wait_lock`
    waited for.
    """
    from hwnas.latency.backends import get_backend
    from hwnas.latency.device import device_slug, fingerprint

    if space.in_channels < 1 or space.num_classes < 1:
        raise HwnasError(f"space '{space.name}': in_channels and num_classes must be >= 1, got "
                         f"{space.in_channels} and {space.num_classes}")
    check_output_dir(out_dir)
    profile = resolve_profile(profile)
    backend = backend if backend is not None else get_backend(profile)
    fp = fingerprint(profile)
    slug = device_slug(fp)
    path = table_path(out_dir, space, profile, slug)

    def waiting(holder: str) -> None:
        print(f"{display_path(path)}: waiting for another hwnas profile ({holder}) to finish writing it",
              file=sys.stderr)

    with table_lock(path, wait=wait_lock, on_wait=waiting):
        table = _start_table(path, space, profile, fp, slug, resume)
        if resume and _complete(table, space, path, calibration_subnets, seed):
            return ProfileRun(path, 0, 0, complete_before=True, blocks=len(table),
                              subnets=int(table.calibration.get("n_subnets", 0)))
        blocks, subnets = _measure(table, path, space, backend, calibration_subnets=calibration_subnets, seed=seed,
                                   progress=progress, rounds=rounds, on_row=on_row, guard=guard,
                                   max_rounds=max_rounds)
    return ProfileRun(path, blocks, subnets, complete_before=False, blocks=len(table),
                      subnets=int(table.calibration.get("n_subnets", 0)))


def _measure(table: LatencyTable, path: Path, space: SearchSpace, backend: Any, *, calibration_subnets: int,
             seed: int, progress: bool, rounds: int, on_row: Callable[[BlockSpec, Any], None] | None,
             guard: QuietGuard | None, max_rounds: int) -> tuple[int, int]:
    """The blocks `table` lacks, then the calibration subnets; written as they go. (blocks, subnets) measured."""
    from tqdm import tqdm

    clock = time.perf_counter()
    specs = space.all_blocks()
    todo = [spec for spec in specs if spec.key not in table]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=f"blocks {space.name}", unit="block",
               disable=not progress, file=sys.stderr)
    measured_now = 0
    try:
        for start in range(0, len(todo), CHUNK):
            group = todo[start:start + CHUNK]
            items = [(build_block(spec, space.se_ratio).eval(), block_input_shape(spec)) for spec in group]
            timings = time_interleaved(backend, items, rounds, table.statistic, max_rounds=max_rounds, guard=guard,
                                       what=f"timing blocks {len(specs) - len(todo) + start + 1}-"
                                            f"{len(specs) - len(todo) + start + len(group)} of {len(specs)}")
            for spec, timing in zip(group, timings, strict=True):
                table.record(spec, timing)
            now = time.perf_counter()
            _account(table, now - clock, len(group))
            clock, measured_now = now, measured_now + len(group)
            table.save(path)
            bar.update(len(group))
            if on_row is not None:
                for spec, timing in zip(group, timings, strict=True):
                    on_row(spec, timing)
    finally:
        bar.close()

    cal_path = calibration_path(path)
    if calibration_subnets > 0:
        rows = _read_calibration(cal_path)
        done_ids = set(rows["arch_id"])
        archs = calibration_archs(space, calibration_subnets, seed)
        todo_archs = [a for a in archs if a.arch_id not in done_ids]
        subnets_now = len(todo_archs)

        def write(chunk: list[tuple[Arch, Any]]) -> None:
            nonlocal rows
            new = pd.DataFrame([_calibration_row(table, a, t) for a, t in chunk])
            rows = new if rows.empty else pd.concat([rows, new], ignore_index=True)
            atomic_write_text(cal_path, rows.to_csv(index=False, float_format="%.6g"))

        measure_subnets(space, todo_archs, backend, rounds=rounds, statistic=table.statistic, on_chunk=write,
                        progress=progress, desc=f"calibration {space.name}", guard=guard, max_rounds=max_rounds)
        wanted = {a.arch_id: a for a in archs}
        stat = f"{table.statistic}_ms"
        measured = [(wanted[i], float(v)) for i, v in zip(rows["arch_id"], rows[stat], strict=True) if i in wanted]
        table.fit_calibration(measured)
    else:
        subnets_now = 0
        cal_path.unlink(missing_ok=True)
        table.fit_calibration([])
    _account(table, time.perf_counter() - clock, 0)
    table.meta["profiling"]["measured_last_run"] = measured_now
    table.meta["profiling"]["schedule"] = {"min_rounds": rounds, "max_rounds": max_rounds, "agree": AGREE,
                                           "blocks_per_group": CHUNK, "subnets_per_group": SUBNET_CHUNK}
    if guard is not None:
        table.meta["quiet"] = guard.summary()
    table.save(path)
    if progress:
        info = table.meta["profiling"]
        cal = table.calibration
        resid = cal.get("residuals", {})
        print(f"profiled {len(specs)} blocks of {space.name} ({measured_now} measured in this run) and "
              f"{cal.get('n_subnets', 0)} calibration subnets in {info['seconds']:.1f} s in total; "
              f"calibration {cal['kind']}"
              + (f", in-sample MAPE {resid['mape_pct']:.2f} %" if "mape_pct" in resid else ""),
              file=sys.stderr)
    return measured_now, subnets_now


def _account(table: LatencyTable, seconds: float, blocks: int) -> None:
    """Profiling time accumulates over resumed runs, so the table says what it cost in all."""
    info = table.meta.setdefault("profiling", {"seconds": 0.0, "blocks_measured": 0})
    info["seconds"] = float(info.get("seconds", 0.0)) + seconds
    info["blocks_measured"] = int(info.get("blocks_measured", 0)) + blocks


def _calibration_row(table: LatencyTable, arch: Arch, timing: Any) -> dict[str, Any]:
    return {"arch_id": arch.arch_id, "arch": json.dumps(arch.to_dict(), sort_keys=True),
            "raw_ms": table.predict_raw(arch), "median_ms": timing.median_ms, "p10_ms": timing.p10_ms,
            "p90_ms": timing.p90_ms, "mean_ms": timing.mean_ms, "min_ms": timing.min_ms, "n": timing.n,
            "rounds": timing.rounds, "others_busy": timing.others_busy}
