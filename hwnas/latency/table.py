"""Latency lookup tables: one measured row per block key, plus a calibration fitted on whole subnets.

A table is two files: `<device-slug>__<profile>.csv` (key, kind, median_ms, p10_ms, p90_ms, n, and
mean_ms) and `<same>.meta.json` (space spec, profile, device fingerprint, calibration). Prediction is
`intercept + sum over blocks of (scale[kind] * t_block + per_block[kind])`: separable over blocks, so a
search can cache per-block costs and the exact latency range of a space needs no enumeration.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hwnas.errors import ArchError, LatencyTableError
from hwnas.fileio import atomic_write_text
from hwnas.jsonable import jsonable as _jsonable
from hwnas.space import Arch, BlockSpec, SearchSpace

FORMAT_VERSION = 1
KINDS = ("stem", "first", "mbconv", "head")
COLUMNS = ("key", "kind", "median_ms", "p10_ms", "p90_ms", "n")
OPTIONAL_COLUMNS = ("mean_ms", "min_ms")
META_FIELDS = ("format_version", "space", "profile", "fingerprint", "device_slug", "calibration")

# Profile fields that decide what a number means; the rest (name, warm-up, repeats, notes) only how
# carefully it was measured.
PROFILE_IDENTITY_FIELDS = ("backend", "precision", "batch_size", "threads", "statistic", "device", "channels_last")
PROFILE_SOFT_FIELDS = ("name", "warmup", "repeats")

CALIBRATION_KINDS = ("none", "scale", "linear", "linear+blocks", "per-kind")
MISMATCH_HINT = "pass allow_mismatch=True (CLI: --allow-mismatch) to use it anyway"


# ---- small file helpers ------------------------------------------------------------------------------
def meta_path_for(csv_path: str | Path) -> Path:
    path = Path(csv_path)
    return path.with_name(path.name.removesuffix(".csv") + ".meta.json")


def git_commit() -> str | None:
    """The commit of the hwnas checkout, if it is one: recorded so a table can be traced to its code."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _profile_dict(profile: Any) -> dict[str, Any] | None:
    if profile is None:
        return None
    return _jsonable(profile)


def _diff_fields(label: str, recorded: Mapping[str, Any], current: Mapping[str, Any],
                 names: Iterable[str]) -> list[str]:
    diffs = []
    for name in names:
        a, b = recorded.get(name), current.get(name)
        if a != b:
            diffs.append(f"{label} {name} {a!r} != {b!r}")
    return diffs


def space_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Which fields of two space specs differ (name first): a table is only valid for its own space."""
    recorded, current = _jsonable(recorded), _jsonable(current)
    diffs = _diff_fields("space", recorded, current, ["name"])
    others = sorted((set(recorded) | set(current)) - {"name", "description"})
    diffs += _diff_fields("space", recorded, current, others)
    return diffs


def profile_differences(recorded: Mapping[str, Any] | None,
                        current: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
    """(identity, soft) differences between two profiles; identity ones change what a number means."""
    if recorded is None or current is None:
        return [], []
    recorded, current = _jsonable(recorded), _jsonable(current)
    return (_diff_fields("profile", recorded, current, PROFILE_IDENTITY_FIELDS),
            _diff_fields("profile", recorded, current, PROFILE_SOFT_FIELDS))


# ---- calibration ---------------------------------------------------------------------------------------
def _identity_calibration() -> dict[str, Any]:
    return {"kind": "none", "coefficients": {"intercept": 0.0, "scale": dict.fromkeys(KINDS, 1.0),
                                             "per_block": dict.fromkeys(KINDS, 0.0)},
            "n_subnets": 0, "residuals": {}}


def _design(kind: str, feats: np.ndarray) -> np.ndarray:
    """Columns of the model `kind` from per-arch features [t_stem, t_first, t_mbconv, t_head, n_mbconv]."""
    t_all = feats[:, :4].sum(axis=1)
    one = np.ones(len(feats))
    if kind == "scale":
        return t_all[:, None]
    if kind == "linear":
        return np.column_stack([t_all, one])
    if kind == "linear+blocks":
        return np.column_stack([t_all, feats[:, 4], one])
    if kind == "per-kind":
        t_fixed = feats[:, 0] + feats[:, 1] + feats[:, 3]
        return np.column_stack([feats[:, 2], t_fixed, feats[:, 4], one])
    raise ValueError(kind)


# Which design columns are scales (kept > 0 so that prediction is monotone in every block's time).
_N_SCALES = {"scale": 1, "linear": 1, "linear+blocks": 1, "per-kind": 2}


def _solve(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Huber fit of relative residuals (x @ w - y) / y, scales bounded positive.

    Relative, because the figure of merit is the share of subnets within +-5 %; Huber, because one
    subnet timed during a burst of load must not tilt the line for all the others.
    """
    from scipy.optimize import least_squares

    xs = x / y[:, None]
    w0, *_ = np.linalg.lstsq(xs, np.ones_like(y), rcond=None)
    n_scales = _N_SCALES[kind]
    lower = np.full(x.shape[1], -np.inf)
    lower[:n_scales] = 1e-6
    w0 = np.maximum(w0, lower + 1e-9)
    if x.shape[0] <= x.shape[1]:
        return w0
    result = least_squares(lambda w: xs @ w - 1.0, w0, bounds=(lower, np.full(x.shape[1], np.inf)),
                           loss="huber", f_scale=0.02, method="trf")
    return result.x


def _coefficients(kind: str, w: np.ndarray) -> dict[str, Any]:
    scale = dict.fromkeys(KINDS, 1.0)
    per_block = dict.fromkeys(KINDS, 0.0)
    intercept = 0.0
    if kind in ("scale", "linear", "linear+blocks"):
        scale = dict.fromkeys(KINDS, float(w[0]))
    if kind == "linear":
        intercept = float(w[1])
    if kind == "linear+blocks":
        per_block["mbconv"] = float(w[1])
        intercept = float(w[2])
    if kind == "per-kind":
        scale = {"stem": float(w[1]), "first": float(w[1]), "mbconv": float(w[0]), "head": float(w[1])}
        per_block["mbconv"] = float(w[2])
        intercept = float(w[3])
    return {"intercept": intercept, "scale": scale, "per_block": per_block}


def _residual_summary(rel: np.ndarray) -> dict[str, float]:
    rel = np.abs(rel)
    return {"mape_pct": float(100 * rel.mean()), "max_abs_pct": float(100 * rel.max()),
            "within_5pct": float((rel <= 0.05).mean()), "within_10pct": float((rel <= 0.10).mean())}


def _loo_relative_errors(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    errors = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        w = _solve(kind, x[keep], y[keep])
        errors[i] = (x[i] @ w - y[i]) / y[i]
    return errors


# ---- the table ---------------------------------------------------------------------------------------------
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
            device_slug: str | None = None) -> LatencyTable:
        """An empty table for `space`, measured with `profile` on the device `fingerprint` describes."""
        from hwnas import __version__

        meta = {
            "format_version": FORMAT_VERSION,
            "space": _jsonable(space.to_dict()),
            "profile": _profile_dict(profile),
            "fingerprint": _jsonable(dict(fingerprint or {})),
            "device_slug": device_slug or "unknown",
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "hwnas_version": __version__,
            "git_commit": git_commit(),
            "calibration": _identity_calibration(),
        }
        rows = pd.DataFrame({c: pd.Series(dtype="object" if c in ("key", "kind") else "float64")
                             for c in (*COLUMNS, *OPTIONAL_COLUMNS)})
        rows["n"] = rows["n"].astype("int64")
        return cls(rows, meta)

    def record(self, spec: BlockSpec, timing: Any) -> None:
        """Add (or replace) the row of one block from a backend `Timing`."""
        row = {"key": spec.key, "kind": spec.kind, "median_ms": float(timing.median_ms),
               "p10_ms": float(timing.p10_ms), "p90_ms": float(timing.p90_ms), "n": int(timing.n),
               "mean_ms": float(timing.mean_ms), "min_ms": float(getattr(timing, "min_ms", math.nan))}
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
        meta = _read_meta(meta_path)
        rows = _read_rows(path)
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
        self._slot_cache: dict[Any, Any] = {}
        self._depth_set = set(self.meta["space"].get("depth_choices", ()))
        coeffs = self.meta.get("calibration", _identity_calibration())["coefficients"]
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

        Keys are memoised per slot (resolution, stage, index, kernel, expand), since a block's key
        depends on nothing else: a search over 50k fresh archs builds BlockSpecs only for new slots.
        """
        space = self.space
        if arch.space != space.name:
            raise ArchError(f"arch belongs to space '{arch.space}', but the table is for '{space.name}'")
        if (len(arch.depths) != space.num_stages or not self._depth_set.issuperset(arch.depths)
                or len(arch.kernels) != sum(arch.depths) or len(arch.expands) != len(arch.kernels)):
            space.validate(arch)  # raises, naming the bad field
        resolution = arch.resolution
        slots = self._slot_cache
        keys = []
        try:
            fixed = slots[resolution]
            start = 0
            for stage, depth in enumerate(arch.depths):
                for index in range(depth):
                    i = start + index
                    keys.append(slots[(resolution, stage, index, arch.kernels[i], arch.expands[i])])
                start += depth
        except KeyError:
            specs = space.blocks(arch)  # validates the arch
            mb = [s for s in specs if s.kind == "mbconv"]
            for (stage, index, kernel, expand), spec in zip(space.iter_stage_blocks(arch), mb, strict=True):
                slots[(resolution, stage, index, kernel, expand)] = spec.key
            slots[resolution] = fixed = tuple(s.key for s in specs if s.kind != "mbconv")
            return tuple(s.key for s in specs)
        return (fixed[0], fixed[1], *keys, fixed[2])

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

    def predict_many(self, archs: Iterable[Arch]) -> np.ndarray:
        """Calibrated latencies of many archs: per-block costs are computed once and looked up."""
        cost: dict[str, float] = {}
        out = []
        intercept = self._intercept
        for arch in archs:
            total = intercept
            for key in self.block_keys(arch):
                c = cost.get(key)
                if c is None:
                    kind = key.split("_", 1)[0]
                    c = cost[key] = self._scale[kind] * self._value(key) + self._per_block[kind]
                total += c
            out.append(total)
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
            # one uniform max-depth arch per (kernel, expand) covers every slot of this resolution
            slot_costs: dict[tuple[int, int], list[float]] = {}
            fixed = None
            for kernel in space.kernel_choices:
                for expand in space.expand_choices:
                    n = space.max_depth * space.num_stages
                    arch = Arch(space.name, resolution, (space.max_depth,) * space.num_stages, (kernel,) * n,
                                (expand,) * n)
                    specs = space.blocks(arch)
                    mb = iter(s for s in specs if s.kind == "mbconv")
                    for stage, index, _, _ in space.iter_stage_blocks(arch):
                        slot_costs.setdefault((stage, index), []).append(self.block_cost(next(mb)))
                    if fixed is None:
                        fixed = sum(self.block_cost(s) for s in specs if s.kind != "mbconv")
            assert fixed is not None
            best = worst = fixed + self._intercept
            for stage in range(space.num_stages):
                mins = np.cumsum([min(slot_costs[(stage, i)]) for i in range(space.max_depth)])
                maxs = np.cumsum([max(slot_costs[(stage, i)]) for i in range(space.max_depth)])
                best += min(mins[d - 1] for d in space.depth_choices)
                worst += max(maxs[d - 1] for d in space.depth_choices)
            lo = best if lo is None else min(lo, best)
            hi = worst if hi is None else max(hi, worst)
        assert lo is not None and hi is not None
        return float(lo), float(hi)

    # ---- target checks -------------------------------------------------------------------------------------------
    def target_differences(self, space: SearchSpace | None = None, profile: Any = None,
                           fingerprint: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
        """(identity, soft) differences between what the table was measured for and the given target."""
        identity: list[str] = []
        soft: list[str] = []
        if space is not None:
            identity += space_differences(self.meta["space"], space.to_dict())
        if profile is not None:
            ident, sft = profile_differences(self.profile_dict, _profile_dict(profile))
            identity += ident
            soft += sft
        if fingerprint is not None:
            from hwnas.latency.device import fingerprint_differences

            ident, sft = fingerprint_differences(self.fingerprint, dict(fingerprint))
            identity += [f"device {d}" for d in ident]
            soft += [f"device {d}" for d in sft]
        return identity, soft

    def check_target(self, space: SearchSpace | None = None, profile: Any = None,
                     fingerprint: Mapping[str, Any] | None = None, *, allow_mismatch: bool = False) -> list[str]:
        """Refuse a table measured for another space, profile or device; return the soft differences.

        Identity differences (space, backend/precision/batch/threads, CPU or GPU model, ...) make the
        numbers mean something else and raise unless `allow_mismatch` (then they are returned too,
        first); soft ones (library versions, driver, repeat counts) come back as warnings.
        """
        identity, soft = self.target_differences(space, profile, fingerprint)
        if identity and not allow_mismatch:
            where = f"{self.path}: " if self.path else ""
            raise LatencyTableError(f"{where}table was measured for another target ({'; '.join(identity)}); "
                                    f"{MISMATCH_HINT}")
        return identity + soft

    # ---- calibration ---------------------------------------------------------------------------------------------
    def fit_calibration(self, measured: Sequence[tuple[Arch, float]], kind: str = "auto") -> dict[str, Any]:
        """Fit how block sums map to whole-subnet latency, store it in the metadata, and return it.

        A block timed alone pays the runtime's per-call overhead and a cold start that a block inside a
        network does not, so the raw sum is biased by a roughly constant amount per block. "auto"
        chooses among the models by leave-one-out error, the simplest on a tie.
        """
        if kind != "auto" and kind not in CALIBRATION_KINDS:
            raise LatencyTableError(f"unknown calibration kind '{kind}'; choose auto or one of "
                                    f"{', '.join(CALIBRATION_KINDS)}")
        archs = [a for a, _ in measured]
        y = np.asarray([float(m) for _, m in measured], dtype=np.float64)
        if len(y) == 0 or kind == "none":
            calibration = _identity_calibration()
            if len(y):
                feats = np.stack([self.raw_features(a) for a in archs])
                calibration["residuals"] = _residual_summary(feats[:, :4].sum(axis=1) / y - 1)
                calibration["n_subnets"] = len(y)
            return self._set_calibration(calibration)
        if np.any(~np.isfinite(y)) or np.any(y <= 0):
            raise LatencyTableError("calibration needs positive, finite measured latencies")
        feats = np.stack([self.raw_features(a) for a in archs])
        raw = feats[:, :4].sum(axis=1)
        candidates: dict[str, dict[str, float]] = {
            "none": _residual_summary(raw / y - 1)}
        if kind == "auto":
            order = [k for k in CALIBRATION_KINDS if k != "none"]
            for name in order:
                x = _design(name, feats)
                if len(y) >= x.shape[1] + 3:
                    candidates[name] = _residual_summary(_loo_relative_errors(name, x, y))
            eligible = [k for k in order if k in candidates]
            if not eligible:
                chosen = "scale"
            else:
                # the simplest model whose LOO error is within 2 % (relative) of the best one
                best = min(candidates[k]["mape_pct"] for k in eligible)
                chosen = next(k for k in eligible if candidates[k]["mape_pct"] <= best * 1.02 + 1e-12)
        else:
            chosen = kind
        x = _design(chosen, feats)
        w = _solve(chosen, x, y)
        rel = (x @ w - y) / y
        calibration = {"kind": chosen, "requested": kind, "coefficients": _coefficients(chosen, w),
                       "n_subnets": len(y), "residuals": _residual_summary(rel),
                       "loo": {k: v for k, v in candidates.items() if k != "none"},
                       "uncalibrated": candidates["none"],
                       "arch_ids": [a.arch_id for a in archs]}
        return self._set_calibration(calibration)

    def _set_calibration(self, calibration: dict[str, Any]) -> dict[str, Any]:
        self.meta["calibration"] = _jsonable(calibration)
        self._reset_caches()
        return self.meta["calibration"]


# ---- readers --------------------------------------------------------------------------------------------------
def _read_meta(meta_path: Path) -> dict[str, Any]:
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


def _read_rows(path: Path) -> pd.DataFrame:
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
