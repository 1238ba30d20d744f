"""Latency lookup tables: one measured row per block key, plus a calibration fitted on whole subnets.

A table is two files: `<device-slug>__<profile>.csv` (key, kind, median_ms, p10_ms, p90_ms, n, and
mean_ms) and `<same>.meta.json` (space spec, profile, device fingerprint, calibration). Prediction is
`intercept + sum over blocks of (scale[kind] * t_block + per_block[kind])`: separable over blocks, so a
search can cache per-block costs and the exact latency range of a space needs no enumeration.
The calibration is fitted in `hwnas.latency.calibration`, a table is matched to its target in
`hwnas.latency.target`, and its files are read in `hwnas.latency.table_files`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.errors import ArchError, LatencyTableError
from hwnas.fileio import atomic_write_text
from hwnas.jsonable import jsonable as _jsonable
from hwnas.latency import calibration as _calibration
from hwnas.latency import target as _target
from hwnas.latency.calibration import identity_calibration
from hwnas.latency.table_files import (
    COLUMNS,
    FORMAT_VERSION,
    KINDS,
    OPTIONAL_COLUMNS,
    meta_path_for,
    read_meta,
    read_rows,
)
from hwnas.provenance import git_commit
from hwnas.space import Arch, BlockSpec, SearchSpace, Slot

__all__ = ["LatencyTable", "meta_path_for"]

# The keys of one resolution's blocks: (stem, first, head), and the inverted residual's per slot choice.
SlotKeys = tuple[tuple[str, str, str], dict[Slot, str]]


class LatencyTable:
    """Measured block latencies of one space on one device and profile, and how to add them up."""

    def __init__(self, rows: pd.DataFrame, meta: Mapping[str, Any], path: str | Path | None = None) -> None:
        self._rows = rows.reset_index(drop=True)
        self.meta: dict[str, Any] = dict(meta)
        self.path = Path(path) if path is not None else None
        self._space: SearchSpace | None = None
        self._reset_caches()

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def new(cls, space: SearchSpace, profile: Any = None, fingerprint: Mapping[str, Any] | None = None,
            device_slug: str | None = None, *, table_dir: str | Path | None = None) -> LatencyTable:
        """An empty table for `space`, measured with `profile` on the device `fingerprint` describes.

        `table_dir` (where it will be saved) lets the profile's file be recorded relative to the table.
        """
        from hwnas import __version__

        meta = {
            "format_version": FORMAT_VERSION,
            "space": _jsonable(space.to_dict()),
            "profile": _target.profile_dict(profile, table_dir),
            "fingerprint": _jsonable(dict(fingerprint or {})),
            "device_slug": device_slug or "unknown",
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "hwnas_version": __version__,
            "git_commit": git_commit(),
            "calibration": identity_calibration(),
        }
        rows = pd.DataFrame({c: pd.Series(dtype="object" if c in ("key", "kind") else "float64")
                             for c in (*COLUMNS, *OPTIONAL_COLUMNS)})
        rows["n"] = rows["n"].astype("int64")
        return cls(rows, meta)

    def record(self, spec: BlockSpec, timing: Any) -> None:
        """Add (or replace) the row of one block from a backend `Timing`."""
        row = {"key": spec.key, "kind": spec.kind, "median_ms": float(timing.median_ms),
               "p10_ms": float(timing.p10_ms), "p90_ms": float(timing.p90_ms), "n": int(timing.n),
               "mean_ms": float(timing.mean_ms), "min_ms": float(getattr(timing, "min_ms", math.nan)),
               "rounds": int(getattr(timing, "rounds", 1)),
               "others_busy": float(getattr(timing, "others_busy", math.nan))}
        rows = self._rows[self._rows["key"] != spec.key]
        new = pd.DataFrame([row])
        self._rows = new if rows.empty else pd.concat([rows, new], ignore_index=True)
        self._reset_caches()

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read a table; anything missing or malformed is a LatencyTableError naming the file and field."""
        path = Path(path)
        if path.suffix != ".csv" and path.name.endswith(".meta.json"):
            path = path.with_name(path.name.removesuffix(".meta.json") + ".csv")
        meta_path = meta_path_for(path)
        if not path.is_file():
            raise LatencyTableError(f"{path}: no such latency table")
        if not meta_path.is_file():
            owner = path.with_name(path.name.removesuffix(".calibration.csv") + ".csv")
            if path.name.endswith(".calibration.csv") and owner.is_file():  # a shell glob's first match
                raise LatencyTableError(f"{path}: this is the calibration file of the table {owner}; pass that")
            raise LatencyTableError(f"{meta_path}: metadata file missing (expected beside {path.name})")
        meta = read_meta(meta_path)
        rows = read_rows(path)
        table = cls(rows, meta, path)
        try:
            table.space  # noqa: B018 - fail now, naming the file, rather than at the first predict
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise LatencyTableError(f"{meta_path}: field 'space' is not a valid space spec ({exc})") from None
        if table.statistic_column not in rows.columns or rows[table.statistic_column].isna().any():
            raise LatencyTableError(f"{path}: column '{table.statistic_column}' is missing or has empty values "
                                    f"(the profile's statistic is '{table.statistic}')")
        return table

    def save(self, path: str | Path | None = None) -> Path:
        """Write CSV and metadata, each atomically; the CSV first, so metadata never names absent rows."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("save() needs a path for a table that was not loaded from one")
        if self.drifted:
            raise LatencyTableError(f"{path}: not saved: this copy of the table is corrected for drift "
                                    f"(x{self.drift_factor:.3f}); save the table it was made from")
        columns = [*COLUMNS, *[c for c in OPTIONAL_COLUMNS if c in self._rows.columns]]
        atomic_write_text(path, self._rows[columns].to_csv(index=False, float_format="%.6g"))
        atomic_write_text(meta_path_for(path), json.dumps(_jsonable(self.meta), indent=2, sort_keys=True) + "\n")
        self.path = path
        return path

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def space_name(self) -> str:
        return str(self.meta["space"]["name"])

    @property
    def space(self) -> SearchSpace:
        """The space the table was measured for, rebuilt from its spec (no registry needed)."""
        if self._space is None:
            self._space = SearchSpace.from_dict(self.meta["space"])
        return self._space

    @property
    def profile_dict(self) -> dict[str, Any] | None:
        return self.meta.get("profile")

    @property
    def profile(self) -> Any:
        """The `DeviceProfile` the table was measured with (None for a synthetic table)."""
        data = self.profile_dict
        if data is None:
            return None
        from hwnas.latency.profiles import DeviceProfile

        names = {f.name for f in fields(DeviceProfile)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("path") is not None:
            kwargs["path"] = Path(kwargs["path"])
        if isinstance(kwargs.get("expect"), Mapping):
            kwargs["expect"] = dict(kwargs["expect"])
        try:
            return DeviceProfile(**kwargs)
        except TypeError as exc:
            where = self.path and meta_path_for(self.path)
            raise LatencyTableError(f"{where}: field 'profile' is not a valid profile ({exc})") from None

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.meta.get("fingerprint") or {})

    @property
    def device_slug(self) -> str:
        return str(self.meta.get("device_slug", "unknown"))

    @property
    def calibration(self) -> dict[str, Any]:
        return self.meta["calibration"]

    @property
    def drifted(self) -> bool:
        """Made by `with_drift`: predictions for the device as it ran in this session, not as profiled."""
        return "drift" in self.meta

    @property
    def drift_factor(self) -> float:
        """How much slower (> 1) the device runs now than when the table was measured; 1 unless `with_drift`."""
        return float((self.meta.get("drift") or {}).get("factor", 1.0))

    def with_drift(self, factor: float, details: Mapping[str, Any] | None = None) -> LatencyTable:
        """The same table predicting `factor` times its calibrated latency: the device as it runs now.

        A copy, for one session: the measured rows and calibration stay as they were, and `save`
        refuses it, so a correction for a passing state of the machine never lands in a committed
        table. `predict_raw` (the plain block sum) is not scaled.
        """
        if not (math.isfinite(factor) and factor > 0):
            raise LatencyTableError(f"drift factor must be a positive number, got {factor}")
        meta = dict(self.meta)
        meta["drift"] = {"factor": float(factor), **_jsonable(dict(details or {}))}
        table = LatencyTable(self._rows, meta, self.path)
        table._space = self._space
        return table

    @property
    def statistic(self) -> str:
        return str((self.profile_dict or {}).get("statistic") or "median")

    @property
    def statistic_column(self) -> str:
        return f"{self.statistic}_ms"

    @property
    def rows(self) -> pd.DataFrame:
        return self._rows.copy()

    @property
    def keys(self) -> set[str]:
        return set(self._rows["key"])

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __repr__(self) -> str:
        drift = f", drift={self.drift_factor:.3f}" if self.drifted else ""
        return (f"LatencyTable(space={self.space_name!r}, device={self.device_slug!r}, rows={len(self)}, "
                f"calibration={self.calibration.get('kind')!r}{drift})")

    # ---- prediction ----------------------------------------------------------------------------------------------
    def _reset_caches(self) -> None:
        column = self.statistic_column if self.statistic_column in self._rows.columns else "median_ms"
        self._values: dict[str, float] = dict(zip(self._rows["key"], self._rows[column].astype(float), strict=True))
        self._slot_cache: dict[int, SlotKeys] = {}
        # per resolution: (stem + first cost, head cost, cost by slot), filled as `predict_many` meets them
        self._cost_cache: dict[int, tuple[float, float, dict[Slot, float]]] = {}
        self._depth_set = set(self.meta["space"].get("depth_choices", ()))
        coeffs = self.meta.get("calibration", identity_calibration())["coefficients"]
        factor = self.drift_factor
        self._scale = {k: factor * float(coeffs["scale"].get(k, 1.0)) for k in KINDS}
        self._per_block = {k: factor * float(coeffs["per_block"].get(k, 0.0)) for k in KINDS}
        self._intercept = factor * float(coeffs.get("intercept", 0.0))

    def _value(self, key: str) -> float:
        try:
            return self._values[key]
        except KeyError:
            where = f"{self.path}: " if self.path else ""
            raise LatencyTableError(f"{where}no entry for block '{key}' (profile the space again, or resume "
                                    "the interrupted profile)") from None

    def block_keys(self, arch: Arch) -> tuple[str, ...]:
        """The LUT keys of `arch`, stem to head.

        Read from the space's slot specs (`SearchSpace.slot_specs`), whose keys are taken once per
        resolution: a search over 50k fresh archs only looks each of its blocks up by slot.
        """
        (stem, first, head), slots = self._slot_keys(arch)
        keys = [stem, first]
        kernels, expands = arch.kernels, arch.expands
        start = 0
        try:
            for stage, depth in enumerate(arch.depths):
                for index in range(depth):
                    keys.append(slots[(stage, index, kernels[start + index], expands[start + index])])
                start += depth
        except KeyError:
            self.space.validate(arch)  # raises, naming the kernel or expand that is not a choice
            raise
        keys.append(head)
        return tuple(keys)

    def _slot_keys(self, arch: Arch) -> SlotKeys:
        """The keys of `arch`'s resolution, after the cheap checks of `arch` (`space.validate` names a failed one)."""
        space = self.space
        if arch.space != space.name:
            raise ArchError(f"arch belongs to space '{arch.space}', but the table is for '{space.name}'")
        if (len(arch.depths) != space.num_stages or not self._depth_set.issuperset(arch.depths)
                or len(arch.kernels) != sum(arch.depths) or len(arch.expands) != len(arch.kernels)):
            space.validate(arch)  # raises, naming the bad field
        try:
            return self._slot_cache[arch.resolution]
        except KeyError:
            space.validate(arch)  # a resolution is only cached once an arch of it was found valid
            specs = space.slot_specs(arch.resolution)
            keys: SlotKeys = ((specs.stem.key, specs.first.key, specs.head.key),
                              {slot: spec.key for slot, spec in specs.mbconv.items()})
            self._slot_cache[arch.resolution] = keys
            return keys

    def _features(self, keys: Sequence[str]) -> tuple[float, float]:
        """(raw sum, calibrated sum) of the blocks named by `keys`."""
        raw = cal = 0.0
        for key in keys:
            t = self._value(key)
            kind = key.split("_", 1)[0]
            raw += t
            cal += self._scale[kind] * t + self._per_block[kind]
        return raw, cal + self._intercept

    def block_cost(self, spec: BlockSpec) -> float:
        """The calibrated cost of one block: what it adds to `predict` (the intercept aside)."""
        return self._scale[spec.kind] * self._value(spec.key) + self._per_block[spec.kind]

    def predict_raw(self, arch: Arch) -> float:
        """The plain sum of the blocks' measured statistic, in milliseconds."""
        return self._features(self.block_keys(arch))[0]

    def predict(self, arch: Arch) -> float:
        """Calibrated latency of the whole subnet, in milliseconds."""
        return self._features(self.block_keys(arch))[1]

    def _key_cost(self, key: str) -> float:
        kind = key.split("_", 1)[0]
        return self._scale[kind] * self._value(key) + self._per_block[kind]

    def predict_many(self, archs: Iterable[Arch]) -> np.ndarray:
        """Calibrated latencies of many archs, equal to `predict` of each: every block's cost is computed once
        (until the calibration or drift changes) and then looked up by its slot and choices (a search prices
        tens of thousands of archs)."""
        per_resolution = self._cost_cache
        out = []
        intercept = self._intercept
        for arch in archs:
            (stem, first, head), slots = self._slot_keys(arch)
            entry = per_resolution.get(arch.resolution)
            if entry is None:
                entry = per_resolution[arch.resolution] = (self._key_cost(stem) + self._key_cost(first),
                                                           self._key_cost(head), {})
            total, head_cost, costs = entry  # summed in `predict`'s order, so the two agree to the last bit
            kernels, expands = arch.kernels, arch.expands
            start = 0
            for stage, depth in enumerate(arch.depths):
                for index in range(depth):
                    slot = (stage, index, kernels[start + index], expands[start + index])
                    c = costs.get(slot)
                    if c is None:
                        key = slots.get(slot)
                        if key is None:
                            self.space.validate(arch)  # raises, naming the kernel or expand that is not a choice
                            raise ArchError(f"arch {arch.arch_id} has no block {slot} in space '{self.space.name}'")
                        c = costs[slot] = self._key_cost(key)
                    total += c
                start += depth
            out.append(total + head_cost + intercept)
        return np.asarray(out, dtype=np.float64)

    def raw_features(self, arch: Arch) -> np.ndarray:
        """[t_stem, t_first, t_mbconv, t_head, n_mbconv]: what the calibration models are fitted on."""
        feats = np.zeros(5)
        for key in self.block_keys(arch):
            kind = key.split("_", 1)[0]
            feats[KINDS.index(kind)] += self._value(key)
            if kind == "mbconv":
                feats[4] += 1
        return feats

    # ---- the space as a whole -------------------------------------------------------------------------------------
    def missing_keys(self, space: SearchSpace | None = None) -> list[str]:
        """Keys of `space`'s blocks (`all_blocks`: every resolution's slot specs, each key once) with no row here."""
        space = space or self.space
        return [spec.key for spec in space.all_blocks() if spec.key not in self._values]

    def latency_range(self, space: SearchSpace | None = None) -> tuple[float, float]:
        """The exact (min, max) predicted latency over every subnet of `space`, without enumerating them.

        Block input sizes depend only on the resolution and the stage strides, and prediction adds up
        independent per-block costs, so per resolution each stage picks its best (worst) depth with the
        best (worst) kernel and expand per slot.
        """
        space = space or self.space
        lo = hi = None
        for resolution in space.resolution_choices:
            specs = space.slot_specs(resolution)
            best = worst = sum(self.block_cost(s) for s in specs.fixed) + self._intercept
            for stage in range(space.num_stages):
                costs = [[self.block_cost(specs.mbconv[(stage, index, kernel, expand)])
                          for kernel in space.kernel_choices for expand in space.expand_choices]
                         for index in range(space.max_depth)]
                mins = np.cumsum([min(c) for c in costs])
                maxs = np.cumsum([max(c) for c in costs])
                best += min(mins[d - 1] for d in space.depth_choices)
                worst += max(maxs[d - 1] for d in space.depth_choices)
            lo = best if lo is None else min(lo, best)
            hi = worst if hi is None else max(hi, worst)
        assert lo is not None and hi is not None
        return float(lo), float(hi)

    # ---- target checks (hwnas.latency.target) -------------------------------------------------------------------
    def target_differences(self, space: SearchSpace | None = None, profile: Any = None,
                           fingerprint: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
        """(identity, soft) differences between what the table was measured for and the given target."""
        return _target.target_differences(self.meta, space, profile, fingerprint)

    def check_target(self, space: SearchSpace | None = None, profile: Any = None,
                     fingerprint: Mapping[str, Any] | None = None, *, allow_mismatch: bool = False) -> list[str]:
        """Refuse a table measured for another space, profile or device; return the soft differences.

        Identity differences (space, backend/precision/batch/threads, CPU or GPU model, ...) make the
        numbers mean something else and raise unless `allow_mismatch` (then they are returned too,
        first); soft ones (library versions, driver, repeat counts) come back as warnings.
        """
        return _target.check_target(self.meta, space, profile, fingerprint, allow_mismatch=allow_mismatch,
                                    path=self.path)

    # ---- calibration (hwnas.latency.calibration) -----------------------------------------------------------------
    def fit_calibration(self, measured: Sequence[tuple[Arch, float]], kind: str = "auto") -> dict[str, Any]:
        """Fit how block sums map to whole-subnet latency, store it in the metadata, and return it.

        A block timed alone pays the runtime's per-call overhead and a cold start that a block inside a
        network does not, so the raw sum is biased by a roughly constant amount per block. "auto"
        chooses among the models (`CALIBRATION_KINDS`) by leave-one-out error, the simplest on a tie.
        """
        return self._set_calibration(_calibration.fit_calibration(measured, self.raw_features, kind))

    def _set_calibration(self, calibration: dict[str, Any]) -> dict[str, Any]:
        self.meta["calibration"] = _jsonable(calibration)
        self._reset_caches()
        return self.meta["calibration"]
