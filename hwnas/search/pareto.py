"""Pareto tools: non-dominated sorting, crowding distance, the accuracy-latency front, 2-D hypervolume.

Every objective is minimised here; accuracy enters as its negative. The 2-D sort runs in
O(n log n) (one pass over the points in lexicographic order, a binary search per point), so
ranking all 50k candidates of a long search costs milliseconds; more objectives fall back to the
plain O(m n^2) peeling.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
from numpy.typing import ArrayLike


def _objectives(objectives: ArrayLike) -> np.ndarray:
    points = np.asarray(objectives, dtype=np.float64)
    if points.ndim == 1:
        points = points[:, None]
    if points.ndim != 2:
        raise ValueError(f"objectives must be (n, m), got shape {points.shape}")
    if np.isnan(points).any():
        raise ValueError("objectives contain NaN")
    return points


def dominates(a: ArrayLike, b: ArrayLike) -> bool:
    """a dominates b (minimisation): no worse in every objective and better in one."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(objectives: ArrayLike) -> np.ndarray:
    """The front index of each row (0: non-dominated; 1: non-dominated once front 0 is removed; ...).

    Rows are points, columns objectives to minimise. Equal points share a front.
    """
    points = _objectives(objectives)
    n, m = points.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(points, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if m == 1:
        return inverse.astype(np.int64)  # unique rows come sorted: a dense rank
    if m == 2:
        ranks = _sort_2d(unique)
    else:
        ranks = _sort_peeling(unique)
    return ranks[inverse]


def _sort_2d(unique: np.ndarray) -> np.ndarray:
    """Fronts of distinct 2-D points given in lexicographic order (what np.unique returns).

    A point is dominated by an earlier one iff that one's second objective is no larger. Within a
    front the second objective falls along the order, so a front is blocked by its last member
    alone, and the fronts' last values stay sorted: the first front that accepts a point is found
    by bisection (the ENS sequential search, with each front's check reduced to one comparison).
    """
    last: list[float] = []  # second objective of each front's last member, non-decreasing
    ranks = np.empty(len(unique), dtype=np.int64)
    for i, f2 in enumerate(unique[:, 1].tolist()):
        k = bisect_right(last, f2)
        if k == len(last):
            last.append(f2)
        else:
            last[k] = f2
        ranks[i] = k
    return ranks


def _sort_peeling(points: np.ndarray) -> np.ndarray:
    n = len(points)
    le = np.all(points[:, None, :] <= points[None, :, :], axis=2)
    lt = np.any(points[:, None, :] < points[None, :, :], axis=2)
    dom = le & lt  # dom[i, j]: i dominates j
    count = dom.sum(axis=0)
    ranks = np.full(n, -1, dtype=np.int64)
    front = np.flatnonzero(count == 0)
    level = 0
    while front.size:
        ranks[front] = level
        count = count - dom[front].sum(axis=0)
        count[ranks >= 0] = -1
        front = np.flatnonzero(count == 0)
        level += 1
    return ranks


def crowding_distance(objectives: ArrayLike) -> np.ndarray:
    """NSGA-II crowding distance of each point of one front: larger means a lonelier point.

    Boundary points of every objective get infinity, so a front's extremes always survive.
    """
    points = _objectives(objectives)
    n, m = points.shape
    distance = np.zeros(n)
    if n <= 2:
        distance[:] = np.inf
        return distance
    for j in range(m):
        order = np.argsort(points[:, j], kind="stable")
        values = points[order, j]
        span = values[-1] - values[0]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (values[2:] - values[:-2]) / span
    return distance


def pareto_mask(latency: ArrayLike, accuracy: ArrayLike) -> np.ndarray:
    """True for each candidate that no other is as fast and as accurate as, and strictly better in one."""
    lat = np.asarray(latency, dtype=np.float64)
    acc = np.asarray(accuracy, dtype=np.float64)
    if lat.shape != acc.shape:
        raise ValueError(f"latency and accuracy differ in shape: {lat.shape} vs {acc.shape}")
    if lat.size == 0:
        return np.zeros(0, dtype=bool)
    return non_dominated_sort(np.column_stack([lat, -acc])) == 0


def hypervolume_2d(objectives: ArrayLike, reference: ArrayLike) -> float:
    """Area dominated by the points and bounded by `reference` (both objectives minimised).

    Points not strictly better than the reference in both objectives add nothing.
    """
    points = _objectives(objectives)
    ref = np.asarray(reference, dtype=np.float64)
    if points.shape[1] != 2 or ref.shape != (2,):
        raise ValueError("hypervolume_2d needs (n, 2) points and a reference of 2 values")
    points = points[(points[:, 0] < ref[0]) & (points[:, 1] < ref[1])]
    if len(points) == 0:
        return 0.0
    front = points[non_dominated_sort(points) == 0]
    front = front[np.lexsort((front[:, 1], front[:, 0]))]  # first objective up, second down
    right = np.append(front[1:, 0], ref[0])
    return float(np.sum((right - front[:, 0]) * (ref[1] - front[:, 1])))


def hypervolume(latency: ArrayLike, accuracy: ArrayLike, ref_latency: float, ref_accuracy: float) -> float:
    """Hypervolume of an accuracy-latency set: area between its front and (ref_latency, ref_accuracy).

    Units are ms x accuracy points. Compare runs only with the same reference point: a slow,
    inaccurate corner that every run's candidates lie inside (e.g. the space's maximum latency and
    the lowest accuracy any run saw).
    """
    lat = np.asarray(latency, dtype=np.float64)
    acc = np.asarray(accuracy, dtype=np.float64)
    return hypervolume_2d(np.column_stack([lat, -acc]), [ref_latency, -ref_accuracy])
