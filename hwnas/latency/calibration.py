"""Calibration of a latency table: how the sum of blocks timed alone maps to whole-subnet latency.

A block timed alone pays the runtime's per-call overhead and a cold start that a block inside a
network does not, so the raw sum is biased by a roughly constant amount per block. Each model here
is fitted on per-arch features [t_stem, t_first, t_mbconv, t_head, n_mbconv] and stays affine in
every block's time (`intercept + sum of scale[kind] * t_block + per_block[kind]`), so prediction
remains separable over blocks. `LatencyTable.fit_calibration` stores what `fit_calibration` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hwnas.errors import LatencyTableError
from hwnas.latency.table_files import KINDS  # the first four features, in this order
from hwnas.space import Arch

CALIBRATION_KINDS = ("none", "scale", "linear", "linear+blocks", "per-kind")

# Which design columns are scales (kept > 0 so that prediction is monotone in every block's time).
_N_SCALES = {"scale": 1, "linear": 1, "linear+blocks": 1, "per-kind": 2}


def identity_calibration() -> dict[str, Any]:
    """No correction: prediction is the plain block sum."""
    return {"kind": "none", "coefficients": {"intercept": 0.0, "scale": dict.fromkeys(KINDS, 1.0),
                                             "per_block": dict.fromkeys(KINDS, 0.0)},
            "n_subnets": 0, "residuals": {}}


def fit_calibration(measured: Sequence[tuple[Arch, float]], features: Callable[[Arch], np.ndarray],
                    kind: str = "auto") -> dict[str, Any]:
    """The calibration of model `kind` fitted on `measured` (arch, ms) pairs, with its residuals.

    `features(arch)` gives the per-arch features (`LatencyTable.raw_features`). "auto" chooses
    among the models by leave-one-out error, the simplest on a tie.
    """
    if kind != "auto" and kind not in CALIBRATION_KINDS:
        raise LatencyTableError(f"unknown calibration kind '{kind}'; choose auto or one of "
                                f"{', '.join(CALIBRATION_KINDS)}")
    archs = [a for a, _ in measured]
    y = np.asarray([float(m) for _, m in measured], dtype=np.float64)
    if len(y) == 0 or kind == "none":
        calibration = identity_calibration()
        if len(y):
            feats = np.stack([features(a) for a in archs])
            calibration["residuals"] = _residual_summary(feats[:, :4].sum(axis=1) / y - 1)
            calibration["n_subnets"] = len(y)
        return calibration
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise LatencyTableError("calibration needs positive, finite measured latencies")
    feats = np.stack([features(a) for a in archs])
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
    return {"kind": chosen, "requested": kind, "coefficients": _coefficients(chosen, w),
            "n_subnets": len(y), "residuals": _residual_summary(rel),
            "loo": {k: v for k, v in candidates.items() if k != "none"},
            "uncalibrated": candidates["none"],
            "arch_ids": [a.arch_id for a in archs]}


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
