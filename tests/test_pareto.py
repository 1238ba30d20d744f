"""Pareto tools against hand-computed values and a brute-force definition of dominance."""

from __future__ import annotations

import numpy as np
import pytest

from hwnas.search.pareto import (
    crowding_distance,
    dominates,
    hypervolume,
    hypervolume_2d,
    non_dominated_sort,
    pareto_mask,
)


def brute_force_ranks(points: np.ndarray) -> np.ndarray:
    """Peel fronts by the definition: a point is in the next front if nothing left dominates it."""
    left = set(range(len(points)))
    ranks = np.full(len(points), -1)
    level = 0
    while left:
        front = [i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)]
        for i in front:
            ranks[i] = level
        left -= set(front)
        level += 1
    return ranks


def test_non_dominated_sort_by_hand() -> None:
    # (minimise, minimise): (2, 3) is beaten by (2, 2) alone; (3, 3) also by (2, 3); (4, 4) by (3, 3)
    points = [(1, 4), (2, 2), (3, 1), (2, 3), (3, 3), (4, 4), (2, 2)]
    assert non_dominated_sort(points).tolist() == [0, 0, 0, 1, 2, 3, 0]


@pytest.mark.parametrize("seed", range(5))
def test_fast_2d_sort_matches_the_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 6, size=(80, 2)).astype(float)  # many ties and duplicates
    expected = brute_force_ranks(points)
    assert non_dominated_sort(points).tolist() == expected.tolist()
    # the general (m > 2) path agrees: a constant third objective changes no dominance
    padded = np.column_stack([points, np.zeros(len(points))])
    assert non_dominated_sort(padded).tolist() == expected.tolist()


def test_pareto_mask_keeps_fast_and_accurate_points() -> None:
    latency = [1.0, 2.0, 2.0, 3.0, 4.0, 3.0]
    accuracy = [70.0, 80.0, 75.0, 79.0, 90.0, 90.0]
    # (2, 75) loses to (2, 80); (3, 79) to (2, 80); (4, 90) to (3, 90)
    assert pareto_mask(latency, accuracy).tolist() == [True, True, False, False, False, True]


def test_crowding_distance_by_hand() -> None:
    front = [(1, 5), (2, 3), (4, 2), (5, 0)]
    # objective 1 spans 4: interior gaps 3/4 and 3/4; objective 2 spans 5: gaps 3/5 and 3/5
    distance = crowding_distance(front)
    assert np.isinf(distance[0]) and np.isinf(distance[3])
    assert distance[1] == pytest.approx(0.75 + 0.6)
    assert distance[2] == pytest.approx(0.75 + 0.6)


def test_hypervolume_by_hand() -> None:
    latency = [1.0, 2.0, 4.0]
    accuracy = [0.5, 0.7, 0.9]
    # staircase against (5 ms, 0.0): [1,2) x 0.5 + [2,4) x 0.7 + [4,5) x 0.9 = 0.5 + 1.4 + 0.9
    assert hypervolume(latency, accuracy, 5.0, 0.0) == pytest.approx(2.8)
    # a dominated point, one slower than the reference and one less accurate than it add nothing
    more_lat, more_acc = [*latency, 3.0, 6.0, 0.5], [*accuracy, 0.6, 1.0, -0.1]
    assert hypervolume(more_lat, more_acc, 5.0, 0.0) == pytest.approx(2.8)
    # a new non-dominated point adds its own rectangle: (0.5, 0.2) adds [0.5, 1) x 0.2
    assert hypervolume([*latency, 0.5], [*accuracy, 0.2], 5.0, 0.0) == pytest.approx(2.9)
    assert hypervolume([], [], 5.0, 0.0) == 0.0


def test_hypervolume_2d_of_one_point_is_its_rectangle() -> None:
    assert hypervolume_2d([[1.0, 2.0]], [4.0, 6.0]) == pytest.approx(3.0 * 4.0)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        non_dominated_sort([[1.0, np.nan]])
    with pytest.raises(ValueError, match="shape"):
        pareto_mask([1.0, 2.0], [1.0])
