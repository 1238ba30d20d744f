"""Samplers: seeded, resumable bit for bit, and attentive ones choose by the score they are given."""

from __future__ import annotations

import numpy as np
import pytest

from hwnas import spaces
from hwnas.errors import HwnasError
from hwnas.flops import arch_flops
from hwnas.sampling import AttentiveSampler, UniformSampler, make_sampler

SPACE = spaces.get("mbv3-32")


def flops_score(candidates):
    return [float(arch_flops(SPACE, a)) for a in candidates]


@pytest.mark.parametrize("name", ["uniform", "attentive-best", "attentive-worst"])
def test_same_seed_same_subnets_and_state_resumes_the_sequence(name: str) -> None:
    a, b = make_sampler(name, SPACE, seed=7), make_sampler(name, SPACE, seed=7)
    first = [a.sample(flops_score) for _ in range(5)]
    assert first == [b.sample(flops_score) for _ in range(5)]
    state = a.state_dict()
    expected = [a.sample(flops_score) for _ in range(5)]
    resumed = make_sampler(name, SPACE, seed=123)  # another seed: the state must override it
    resumed.load_state_dict(state)
    assert [resumed.sample(flops_score) for _ in range(5)] == expected
    assert make_sampler(name, SPACE, seed=8).sample(flops_score) != first[0] or name != "uniform"


def test_uniform_covers_every_resolution_and_depth() -> None:
    sampler = UniformSampler(SPACE, seed=0)
    archs = [sampler.sample() for _ in range(200)]
    assert {a.resolution for a in archs} == set(SPACE.resolution_choices)
    assert {d for a in archs for d in a.depths} == set(SPACE.depth_choices)


def test_attentive_best_and_worst_keep_the_lowest_and_highest_scored_candidate() -> None:
    for mode, pick in (("best", min), ("worst", max)):
        sampler = AttentiveSampler(SPACE, seed=3, mode=mode, k=4)
        probe = AttentiveSampler(SPACE, seed=3, mode=mode, k=4)
        for _ in range(10):
            candidates = probe.candidates()  # the same draws the sampler is about to make
            chosen = sampler.sample(flops_score)
            assert len(set(candidates)) > 1
            assert chosen == pick(candidates, key=lambda a: arch_flops(SPACE, a))


def test_attentive_subnets_spread_over_the_whole_flops_range() -> None:
    """Uniform FLOPs targets reach the large end of the space, which uniform choices never do."""
    attentive = AttentiveSampler(SPACE, seed=0, mode="best", k=1)
    uniform = UniformSampler(SPACE, seed=0)
    lo, hi = attentive.min_flops, attentive.max_flops

    def deciles(archs):
        position = [(arch_flops(SPACE, a) - lo) / (hi - lo) for a in archs]
        return np.histogram(position, bins=10, range=(0, 1))[0] / len(archs)

    assert deciles([attentive.sample() for _ in range(300)]).min() > 0.04
    assert deciles([uniform.sample() for _ in range(300)])[-3:].sum() == 0


def test_attentive_ignores_non_finite_scores() -> None:
    sampler = AttentiveSampler(SPACE, seed=1, mode="best", k=3)
    probe = AttentiveSampler(SPACE, seed=1, mode="best", k=3)
    candidates = probe.candidates()
    assert sampler.sample(lambda c: [float("nan"), 5.0, 1.0]) == candidates[2]


def test_unknown_sampler_and_bad_state_are_refused() -> None:
    with pytest.raises(HwnasError, match="unknown sampler 'greedy'"):
        make_sampler("greedy", SPACE, seed=0)
    with pytest.raises(HwnasError, match="'uniform', not 'attentive-best'"):
        make_sampler("attentive-best", SPACE, 0).load_state_dict(UniformSampler(SPACE, 0).state_dict())
