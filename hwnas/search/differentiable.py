"""Differentiable search under a hard latency budget: a learned distribution over the space's choices.

The architecture parameters are logits of independent categoricals, one per elastic choice of an
`hwnas.SearchSpace`: the resolution, the depth of each stage, and the kernel and expand ratio of
every block slot (a slot beyond its stage's depth is latent: it changes nothing until the depth
grows). Each step samples single paths (whole discrete archs) from the distribution and moves the
logits along the gradient of the Lagrangian

    L(theta, lambda) = -E_theta[reward(arch)] + lambda * (E_theta[latency(arch)] / budget - 1)

with Adam, then raises or lowers the multiplier by dual ascent, `lambda <- max(0, lambda + dual_lr *
(E[latency] / budget - 1))`: nobody tunes a latency weight, the budget sets it.

Why the score-function gradient for the reward. The supernet runs one discrete active arch
(`Supernet.set_active`: kernels cropped, channels sliced, blocks skipped); no relaxed one-hot
multiplies any of its ops, and an `AccuracyEvaluator` is a black box. Gumbel-softmax
straight-through would need the network's output to be a differentiable function of the sampled
one-hots; a "multiply the block output by its one-hot" trick (DSNAS) does not cover a skipped block
or a cropped kernel without changing the supernet. The score-function (REINFORCE) estimator, `E[(r -
b) * grad log p(arch)]`, is unbiased for any reward, needs nothing but samples, and works with every
evaluator. Its variance is kept low by (1) a moving-average baseline `b` with the advantage divided
by a moving standard deviation (so the step does not depend on whether accuracy is in percent or a
fraction), (2) log-probabilities over the *active* choices only (a latent slot does not change the
reward; its score only adds noise), and (3) with `reward="batch"`, common random numbers: every arch
sampled in a step is scored on the same batch.

The latency term has no variance at all: for a table whose prediction is `intercept + sum of
block_cost(block)` (every calibration `LatencyTable` fits is affine in the measured block times:
'none', 'scale', 'linear', 'linear+blocks', 'per-kind'), the expectation is exact by linearity. A
block's cost depends only on its slot (`SearchSpace.slot_specs`, priced by
`hwnas.genes.SlotLatency`), slot `i` of stage `s` is present when the stage's depth exceeds `i`, and
the choices are independent, so

    E[latency] = intercept + sum_r P(r) * (fixed(r)
                 + sum_{s,i} P(depth_s > i) * sum_{k,e} P(kernel_si = k) P(expand_si = e) cost(r, s, i, k, e))

which is what `ExpectedLatency.exact` (`hwnas.search.distribution`) computes as a differentiable
function of the logits, in the same calibrated milliseconds as `LatencyTable.predict`. The
additivity is checked against `predict` on a few archs; a model with `block_cost` whose predictions
are not additive is an error rather than a silently wrong expectation. A latency model with
`predict` only (no block costs) gets a Monte-Carlo estimate instead (`mc_samples` predicted archs
per step, score-function gradient with a leave-one-out baseline), reported as such in
`info["latency_expectation"]`.

Rewards. With any evaluator (`reward="evaluator"`, the default), the reward of an arch is its
accuracy from `evaluator.evaluate`; accuracies are cached, so `queries` counts distinct archs, as
for the other strategies. With a `SupernetEvaluator`, `reward="batch"` scores each sampled arch by
the negative cross-entropy of the supernet on a validation batch (batch statistics in BN, the
supernet's running statistics untouched), and `finetune=True` also trains the shared weights on the
sampled paths with SGD on training batches (DSNAS-style joint search). Fine-tuning works on a copy
of the supernet; its state comes back in `SearchResult.supernet_state` (`hwnas search` writes it to
OUT/supernet.pt), and the derived arch is scored with the fine-tuned weights.

The derived arch is the distribution's argmax, repaired (`hwnas.search.derive`) on the latency model
to the band between `band * budget` and the budget: while over the budget, the step down (one
kernel, expand, depth or resolution choice to the next smaller value) that costs the least
log-probability per millisecond saved; while under the band, the step up that fits and costs the
least log-probability per millisecond gained (a step up paired with a step down when no single step
fits). The learned log-probability is the search's estimate of what a choice is worth: it is what
the reward gradient raised, net of what the multiplier charged for its latency. The returned arch is
checked with `latency_model.predict` itself: it is never over the budget. With the evaluator's
reward, every arch sampled on the way was scored by the same evaluator as the derived one, so a
sampled arch in the band that scored higher is returned instead (`info["picked"]` says which; the
derived arch and its accuracy stay in `info`): on the synthetic tests the repaired argmax alone
lands in the best few per cent of the feasible archs at most budgets but not at the tightest. A
budget below the fastest subnet is a `BudgetError` with the feasible range, before anything is
evaluated."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.errors import HwnasError
from hwnas.search.budget import check_budget
from hwnas.search.derive import Repair
from hwnas.search.distribution import DTYPE, ArchDistribution, ExpectedLatency, distribution_for
from hwnas.search.protocols import (
    AccuracyEvaluator,
    LatencyModel,
    SearchSpaceLike,
    SupernetScoring,
    evaluate_accuracies,
    predict_latencies,
)
from hwnas.search.result import SearchResult, build_result
from hwnas.search.state import walk_down

REWARDS = ("evaluator", "batch")


# ---- supernet batches ----------------------------------------------------------------------------------------
@contextmanager
def _batch_statistics(net: nn.Module) -> Iterator[None]:
    """BN on batch statistics, dropout off, and every BN buffer restored afterwards (scoring, not training)."""
    was_training = net.training
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    net.eval()
    for m in norms:
        m.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
        net.train(was_training)


class _SupernetRewards:
    """Batch rewards (-cross-entropy on a validation batch) and optional joint fine-tuning of a supernet copy."""

    def __init__(self, evaluator: Any, *, finetune: bool, batch_size: int, weight_lr: float, seed: int) -> None:
        if not isinstance(evaluator, SupernetScoring):
            raise HwnasError(f"reward='batch' and finetune need an evaluator backed by a supernet and data (a "
                             f"SupernetEvaluator); got a {type(evaluator).__name__}")
        self.evaluator, self.finetune = evaluator, finetune
        self.device = evaluator.device
        self.net = copy.deepcopy(evaluator.supernet) if finetune else evaluator.supernet
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=weight_lr, momentum=0.9) if finetune else None
        self.task_loss = math.nan
        self.batch_accuracy = math.nan

    def __call__(self, archs: list[Any], step: int) -> np.ndarray:
        net, seed = self.net, self.seed * 1_000_003 + step
        losses, correct = [], []
        with torch.no_grad(), _batch_statistics(net):
            for arch in archs:
                x, y = self.evaluator.validation_batch(self.batch_size, arch.resolution, seed)
                out = net.set_active(arch)(x)
                losses.append(float(F.cross_entropy(out, y)))
                correct.append(float((out.argmax(1) == y).float().mean()))
        if self.optimizer is not None:
            net.train()
            self.optimizer.zero_grad(set_to_none=True)
            for arch in archs:
                x, y = self.evaluator.training_batch(self.batch_size, arch.resolution, seed)
                (F.cross_entropy(net.set_active(arch)(x), y) / len(archs)).backward()
            self.optimizer.step()
            net.eval()
        self.task_loss = float(np.mean(losses))
        self.batch_accuracy = 100.0 * float(np.mean(correct))
        return -np.asarray(losses)

    def final_evaluator(self) -> AccuracyEvaluator:
        """The evaluator of the derived arch: the caller's, or a copy on the fine-tuned weights."""
        if not self.finetune:
            return self.evaluator
        return self.evaluator.with_supernet(self.net.eval())


# ---- the derived arch ------------------------------------------------------------------------------------------
def _derive(space: Any, dist: Any, expectation: ExpectedLatency, model: LatencyModel, argmax: np.ndarray,
            budget: float, band: float, rng: np.random.Generator, evaluated_within: list[Any],
            cache: dict[Any, float]) -> tuple[Any, list[str]]:
    """The arch the distribution stands for, within the budget; never a failure.

    An `hwnas.SearchSpace`: its argmax repaired into the band by choice steps (`hwnas.search.derive`).
    Another space's genes have no order to step along: the most probable of the argmax and 512
    fresh samples that the model prices within the budget. Where neither finds one (a model that
    only predicts, an argmax far over a tight budget), the most accurate arch evaluated within the
    budget, else the fastest a walk down from the smallest arch finds.
    """
    if isinstance(dist, ArchDistribution):
        # slot sums and predict may differ in the last bit: repair to a hair under the budget when pricing by slots
        limit = budget * (1 - 1e-9) if expectation.is_exact else budget
        repaired, _, moves = Repair(dist, expectation, limit, band * budget / limit)(argmax)
        arch = dist.decode(repaired)[0]
        if float(model.predict(arch)) <= budget:
            return arch, moves
    else:
        rows = np.concatenate([argmax[None, :], dist.sample(512, rng)])
        with torch.no_grad():
            logp = dist.log_prob(rows).numpy()
        prices = expectation.price(rows)
        ok = np.flatnonzero(prices <= budget)
        if len(ok):
            j = int(ok[np.argmax(logp[ok])])
            arch = dist.decode(rows[j:j + 1])[0]
            if float(model.predict(arch)) <= budget:
                return arch, ["argmax" if j == 0 else "most probable sample within the budget"]
        moves = ["no sample within the budget"]
    if evaluated_within:
        return max(evaluated_within, key=lambda a: cache[a]), [*moves, "the most accurate evaluated arch in budget"]
    arch, lat = walk_down(space, model, budget, rng, 200)
    if lat > budget:
        raise HwnasError(f"found no arch of space '{space.name}' within {budget:.4g} ms (fastest found {lat:.4g} ms)")
    return arch, [*moves, "the fastest arch a walk down found"]


# ---- the searcher ------------------------------------------------------------------------------------------------
def differentiable_search(space: SearchSpaceLike, evaluator: AccuracyEvaluator, latency_model: LatencyModel,
                          budget_ms: float, *, queries: int = 1000, steps: int | None = None,
                          samples_per_step: int = 4, lr: float = 0.1, dual_lr: float = 20.0,
                          baseline_decay: float = 0.9, reward: str | None = None, finetune: bool = False,
                          batch_size: int = 128, weight_lr: float = 0.005, band: float = 0.97,
                          mc_samples: int = 64, seed: int = 0, seed_population: Iterable[Any] | None = None,
                          progress: bool = False, costs: bool = True,
                          time_limit_s: float | None = None) -> SearchResult:
    """Learn a distribution over the archs of `space` under `budget_ms`; return its repaired argmax.

    `queries` bounds the distinct archs `evaluator` scores (one is kept for the derived arch);
    `steps` bounds the logit updates (default: 10 * queries / samples_per_step with the evaluator's
    reward, 200 with batch rewards), each on `samples_per_step` sampled archs. `lr` is Adam's step
    on the logits, `dual_lr` the multiplier's step per unit of relative budget violation.
    `reward` is "evaluator" (default) or "batch"; `finetune=True` (implies "batch") trains a copy
    of the supernet's shared weights on the sampled paths with SGD at `weight_lr` on batches of
    `batch_size`. `band` is the share of the budget the derived arch is repaired to fill at least
(0: only shrink an argmax over the budget, never grow one under it).
    `seed_population` archs lean the initial logits toward their choices. See the module doc.
    """
    reward = reward if reward is not None else ("batch" if finetune else "evaluator")
    if reward not in REWARDS:
        raise HwnasError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    if finetune and reward != "batch":
        raise HwnasError("finetune=True needs reward='batch' (fine-tuned weights make cached accuracies stale)")
    if queries < 1:
        raise HwnasError(f"queries must be >= 1, got {queries}")
    if samples_per_step < 1:
        raise HwnasError(f"samples_per_step must be >= 1, got {samples_per_step}")
    if not 0 <= band <= 1:
        raise HwnasError(f"band must lie in [0, 1], got {band}")
    if steps is not None and steps < 0:
        raise HwnasError(f"steps must be >= 0, got {steps}")
    dist = distribution_for(space)
    feasible = check_budget(space, latency_model, budget_ms, seed=seed)
    budget = float(budget_ms)
    expectation = ExpectedLatency(space, latency_model, mc_samples=mc_samples)
    rewards = _SupernetRewards(evaluator, finetune=finetune, batch_size=batch_size, weight_lr=weight_lr,
                               seed=seed) if reward == "batch" else None
    if steps is None:
        steps = 200 if rewards is not None else max(50, 10 * queries // samples_per_step)
    rng = np.random.default_rng(seed)
    seeds = [space.validate(a) for a in (seed_population or ())]
    seeded = dist.init_from([a for a, lat in zip(seeds, predict_latencies(latency_model, seeds), strict=True)
                             if lat <= budget])
    optimizer = torch.optim.Adam(dist.parameters(), lr=lr)

    archs: list[Any] = []
    lat_of: list[float] = []
    acc_of: list[float] = []
    generation: list[int] = []
    cache: dict[Any, float] = {}
    history: list[dict[str, Any]] = []
    multiplier, baseline, spread = 0.0, math.nan, math.nan
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="search differentiable", unit="step", file=sys.stderr, dynamic_ncols=True)
    stop = f"{steps} steps done"
    reserve = 1  # a query kept for the derived arch
    deadline = None if time_limit_s is None else time.monotonic() + float(time_limit_s)
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            stop = "time limit reached"
            break
        genes = dist.sample(samples_per_step, rng)
        sampled = dist.decode(genes)
        if rewards is not None:
            r = rewards(sampled, step)
        else:
            fresh = list(dict.fromkeys(a for a in sampled if a not in cache))
            if len(fresh) > max(queries - reserve - len(archs), 0):
                stop = "query budget spent"  # scoring only the known samples would bias the gradient
                break
            if fresh:
                acc = evaluate_accuracies(evaluator, fresh)
                cache.update(zip(fresh, acc.tolist(), strict=True))
                archs.extend(fresh)
                lat_of.extend(predict_latencies(latency_model, fresh).tolist())
                acc_of.extend(acc.tolist())
                generation.extend([step] * len(fresh))
            r = np.array([cache[a] for a in sampled])
        mean_r = float(r.mean())
        if math.isnan(baseline):
            baseline, spread = mean_r, float(r.var())
        # the spread includes this step's rewards, so an advantage is bounded by sqrt(n / (1 - decay))
        spread = baseline_decay * spread + (1 - baseline_decay) * float(np.mean((r - baseline) ** 2))
        advantage = (r - baseline) / math.sqrt(spread + 1e-12 * (1 + baseline * baseline))
        baseline = baseline_decay * baseline + (1 - baseline_decay) * mean_r

        exp_lat, lat_term = expectation.estimate(dist, rng)
        task = -(torch.as_tensor(advantage, dtype=DTYPE) * dist.log_prob(genes)).mean()
        loss = task + multiplier * lat_term / budget
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        violation = exp_lat / budget - 1
        with torch.no_grad():
            entropy = float(dist.entropy())
        top = dist.argmax()
        history.append({
            "generation": step, "queries": len(archs), "samples": len(sampled),
            "mean_accuracy": rewards.batch_accuracy if rewards is not None else mean_r,
            "task_loss": rewards.task_loss if rewards is not None else -mean_r,
            "expected_latency_ms": exp_lat, "argmax_latency_ms": float(expectation.price(top)[0]),
            "multiplier": multiplier, "entropy": entropy,
            "loss": -mean_r + multiplier * math.sqrt(max(spread, 0.0)) * violation,
        })
        multiplier = max(0.0, multiplier + dual_lr * violation)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(lat=f"{exp_lat:.4g}", lam=f"{multiplier:.3g}", H=f"{entropy:.3g}", refresh=False)
        if entropy < 1e-3:
            stop = f"distribution converged after {step + 1} steps"
            break
    if bar is not None:
        bar.close()

    derived_genes = dist.argmax()
    argmax_lat = float(expectation.price(derived_genes)[0])
    derived, moves = _derive(space, dist, expectation, latency_model, derived_genes, budget, band, rng,
                             [a for a, lat in zip(archs, lat_of, strict=True) if lat <= budget], cache)
    final_lat = float(latency_model.predict(derived))
    final_eval = rewards.final_evaluator() if rewards is not None else evaluator
    if derived not in cache:
        derived_acc = float(evaluate_accuracies(final_eval, [derived])[0])
        cache[derived] = derived_acc
        archs.append(derived)
        lat_of.append(final_lat)
        acc_of.append(derived_acc)
        generation.append(len(history))
    best = derived
    if rewards is None:
        # every sampled arch was scored by the same evaluator: the most accurate one within the budget wins
        within = [i for i, lat in enumerate(lat_of) if lat <= budget]
        sampled_best = max(within, key=lambda i: acc_of[i], default=None)
        if sampled_best is not None and acc_of[sampled_best] > cache[derived]:
            best = archs[sampled_best]
    info: dict[str, Any] = {
        "picked": "derived" if best == derived else "sampled (more accurate than the derived arch, within the budget)",
        "derived_arch": derived.to_json(), "derived_accuracy": cache[derived],
        "feasible_range_ms": [feasible.low_ms, feasible.high_ms], "range_exact": feasible.exact,
        "latency_expectation": "exact" if expectation.is_exact else f"monte-carlo ({mc_samples} samples per step)",
        "reward": reward, "finetune": finetune, "steps": len(history), "samples_per_step": samples_per_step,
        "multiplier": multiplier, "entropy": history[-1]["entropy"] if history else float(dist.entropy().detach()),
        "expected_latency_ms": float(expectation.estimate(dist, rng)[0]), "argmax_latency_ms": argmax_lat,
        "argmax_arch": dist.decode(derived_genes)[0].to_json(), "repair": moves,
        "band_ms": [band * budget, budget], "seeded": seeded,
        "in_band": band * budget <= float(latency_model.predict(best)) <= budget,
        "derived_in_band": band * budget <= final_lat <= budget,
    }
    if rewards is not None and finetune:
        info["supernet_evaluations"] = getattr(final_eval, "evaluations", None)
    result = build_result(space, archs, lat_of, acc_of, generation, budget_ms=budget, latency_model=latency_model,
                          strategy="differentiable", seed=seed, history=history, stop_reason=stop, info=info,
                          costs=costs)
    row = result.candidates.set_index("arch_id", drop=False).loc[best.arch_id]
    state = None
    if rewards is not None and finetune:
        state = {k: v.detach().cpu().clone() for k, v in rewards.net.state_dict().items()}
    return replace(result, best=best, best_row=row, supernet_state=state)
