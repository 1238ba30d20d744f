"""Which subnets the sandwich rule trains between the largest and the smallest.

`UniformSampler` draws every choice uniformly (Once-for-All, BigNAS). `AttentiveSampler` is
AttentiveNAS's best-up / worst-up: draw a target FLOPs uniformly between the smallest and the
largest subnet, take the k random candidates closest to it, score them on the current batch and
keep the best (lowest loss) or the worst (highest loss). Scoring needs the model and the batch, so
the training loop passes a `score` function; the sampler only chooses.

Every random number comes from the sampler's own numpy Generator, seeded explicitly, so every
rank of a distributed run draws the same subnets (scores are all-reduced before choosing) and
`state_dict` / `load_state_dict` make a resumed run draw what the uninterrupted one would have.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.flops import arch_flops
from hwnas.space import Arch, SearchSpace

Score = Callable[[Sequence[Arch]], Sequence[float]]

SAMPLERS = ("uniform", "attentive-best", "attentive-worst")


class UniformSampler:
    """Each choice uniformly and independently (`SearchSpace.sample`)."""

    kind = "uniform"

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.space = space
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)

    def sample(self, score: Score | None = None) -> Arch:
        """One subnet; `score` is accepted for a common interface and never called."""
        return self.space.sample(self.rng)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise HwnasError(f"sampler state is for '{state.get('kind')}', not '{self.kind}'")
        self.rng.bit_generator.state = state["rng"]


class AttentiveSampler(UniformSampler):
    """AttentiveNAS best-up (`mode="best"`) or worst-up (`mode="worst"`) among `k` FLOPs-matched candidates.

    The target is drawn uniformly in FLOPs between the smallest and the largest subnet; the `k`
    candidates are the ones closest to it among `pool` draws. Uniform draws could not serve: they
    pile up in the middle (on mbv3-32 none of 1000 lies in the upper 35 % of the FLOPs range), so
    each draw of the pool first picks a level u in [0, 1] and then leans every choice towards its
    smallest option (u near 0) or its largest (u near 1); the pool then spans the whole range.
    """

    def __init__(self, space: SearchSpace, seed: int, mode: str = "best", k: int = 3, pool: int = 24) -> None:
        super().__init__(space, seed)
        if mode not in ("best", "worst"):
            raise HwnasError(f"attentive sampler mode must be 'best' or 'worst', got {mode!r}")
        if k < 1 or pool < k:
            raise HwnasError(f"attentive sampler needs 1 <= k <= pool, got k={k}, pool={pool}")
        self.mode, self.k, self.pool = mode, int(k), int(pool)
        self.kind = f"attentive-{mode}"
        self.min_flops = arch_flops(space, space.smallest())
        self.max_flops = arch_flops(space, space.largest())

    def _leaning(self, level: float) -> Arch:
        """A random arch whose every choice leans to the small (level 0) or the large (level 1) end."""
        space, rng = self.space, self.rng
        beta = 8.0 * (2.0 * level - 1.0)
        cdfs: dict[int, list[float]] = {}

        def pick(options: tuple[Any, ...]) -> Any:
            ordered = sorted(options)
            n = len(ordered)
            if n not in cdfs:
                weights = np.exp(beta * np.linspace(-0.5, 0.5, n))
                cdfs[n] = (np.cumsum(weights) / weights.sum()).tolist()
            return ordered[min(bisect.bisect_right(cdfs[n], float(rng.random())), n - 1)]

        resolution = pick(space.resolution_choices)
        depths = [pick(space.depth_choices) for _ in space.stages]
        kernels = [pick(space.kernel_choices) for _ in range(sum(depths))]
        expands = [pick(space.expand_choices) for _ in range(sum(depths))]
        return space.validate(Arch(space.name, resolution, tuple(depths), tuple(kernels), tuple(expands)))

    def candidates(self) -> list[Arch]:
        """The `k` candidates for one choice (a fresh target FLOPs each call)."""
        target = self.rng.uniform(self.min_flops, self.max_flops)
        pool = [self._leaning(self.rng.uniform()) for _ in range(self.pool)]
        distance = np.array([abs(arch_flops(self.space, a) - target) for a in pool])
        order = np.argsort(distance, kind="stable")[: self.k]
        return [pool[i] for i in order]

    def sample(self, score: Score | None = None) -> Arch:
        """The best (or worst) of `k` candidates by `score` (a loss per candidate; lower is better).

        Without `score` (nothing to rank them by) the first candidate, the closest to the target.
        """
        candidates = self.candidates()
        if score is None or len(candidates) == 1:
            return candidates[0]
        losses = np.asarray(list(score(candidates)), dtype=np.float64)
        if losses.shape != (len(candidates),):
            raise ValueError(f"score returned {losses.shape} losses for {len(candidates)} candidates")
        losses = np.where(np.isfinite(losses), losses, np.inf if self.mode == "best" else -np.inf)
        index = int(np.argmin(losses)) if self.mode == "best" else int(np.argmax(losses))
        return candidates[index]


def make_sampler(name: str, space: SearchSpace, seed: int, k: int = 3) -> UniformSampler:
    """A sampler by its CLI name: 'uniform', 'attentive-best' or 'attentive-worst'."""
    if name == "uniform":
        return UniformSampler(space, seed)
    if name in ("attentive-best", "attentive-worst"):
        return AttentiveSampler(space, seed, mode=name.split("-", 1)[1], k=k)
    raise HwnasError(f"unknown sampler '{name}'; known: {', '.join(SAMPLERS)}")
