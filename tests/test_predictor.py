"""The accuracy predictor ranks held-out archs well, batches like it scores one by one, and drives a search."""

from __future__ import annotations

import numpy as np
import pytest

from hwnas import spaces
from hwnas.errors import HwnasError
from hwnas.search import evolution_search
from hwnas.search.predictor import AccuracyPredictor, BatchEncoder, kendall_tau

SPACE = spaces.get("mbv3-32")


def additive_accuracy(seed: int = 0, noise: float = 0.0):
    """Accuracy as a sum of per-choice effects (what the one-hot encoding can express), plus noise."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.5, SPACE.encoding_size)
    noise_rng = np.random.default_rng(seed + 1)

    def accuracy(archs: list) -> np.ndarray:
        x = np.stack([SPACE.encode(a) for a in archs])
        return 85 + x @ weights + noise_rng.normal(0, noise, len(archs))

    return accuracy


def sample(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [SPACE.sample(rng) for _ in range(n)]


def test_batch_encoder_equals_space_encode() -> None:
    from test_search import TINY, ToySpace

    for space in (SPACE, spaces.get("mbv3-224"), TINY, ToySpace()):
        rng = np.random.default_rng(1)
        archs = [space.sample(rng) for _ in range(300)]
        encoded = BatchEncoder(space)(archs)
        assert encoded.shape == (300, space.encoding_size) and encoded.dtype == np.float32
        assert np.array_equal(encoded, np.stack([space.encode(a) for a in archs]))


@pytest.mark.parametrize("kind", ["ridge", "mlp", "auto"])
def test_kendall_tau_on_held_out_pairs_of_an_additive_accuracy_is_high(kind: str) -> None:
    accuracy = additive_accuracy(noise=0.3)  # noise of the size of BN-recalibration jitter
    train = sample(400, seed=0)
    predictor = AccuracyPredictor(SPACE, kind, seed=0)
    fit = predictor.fit(train, accuracy(train))
    assert fit.kendall_tau > 0.8, fit
    assert fit.n_train + fit.n_holdout == 400 and fit.n_holdout == 80
    assert fit.kind in (("ridge", "mlp") if kind == "auto" else (kind,))
    assert set(fit.taus) == ({"ridge", "mlp"} if kind == "auto" else {kind})
    # and on fresh archs, against the noiseless truth
    fresh = sample(500, seed=9)
    assert kendall_tau(predictor.evaluate_many(fresh), additive_accuracy(noise=0.0)(fresh)) > 0.8
    assert predictor.kendall_tau == fit.kendall_tau and "Kendall tau" in fit.describe()


def test_auto_prefers_the_mlp_when_accuracy_has_interactions() -> None:
    """Resolution times depth is not additive in the one-hot features: ridge cannot rank it, an MLP can."""

    def accuracy(archs: list) -> np.ndarray:
        return np.array([80 + 0.5 * a.resolution * sum(a.depths) / 10 - 0.02 * (a.resolution - 28) ** 2
                         * sum(a.depths) for a in archs])

    train = sample(400, seed=2)
    fit = AccuracyPredictor(SPACE, "auto", seed=0).fit(train, accuracy(train))
    assert fit.taus["mlp"] > fit.taus["ridge"] and fit.kind == "mlp"


def test_evaluate_many_is_vectorised_and_agrees_with_evaluate() -> None:
    accuracy = additive_accuracy()
    train = sample(100, seed=3)
    for kind in ("ridge", "mlp"):
        predictor = AccuracyPredictor(SPACE, kind, epochs=50)
        predictor.fit(train, accuracy(train))
        archs = sample(50, seed=4)
        many = predictor.evaluate_many(archs)
        assert many.shape == (50,)
        assert np.allclose(many, [predictor.evaluate(a) for a in archs], atol=1e-5)
        assert predictor.evaluate_many([]).shape == (0,)


def test_bad_use_is_one_clear_error() -> None:
    predictor = AccuracyPredictor(SPACE, "ridge")
    with pytest.raises(HwnasError, match="not fitted"):
        predictor.evaluate(SPACE.smallest())
    with pytest.raises(HwnasError, match="at least 5"):
        predictor.fit(sample(3, 0), [1.0, 2.0, 3.0])
    with pytest.raises(HwnasError, match="3 archs but 2"):
        predictor.fit(sample(3, 0), [1.0, 2.0])
    with pytest.raises(HwnasError, match="kind"):
        AccuracyPredictor(SPACE, "forest")


def test_a_predictor_drives_an_evolution_search() -> None:
    from test_search import synthetic_table

    table = synthetic_table(SPACE)
    accuracy = additive_accuracy()
    train = sample(300, seed=5)
    predictor = AccuracyPredictor(SPACE, "ridge")
    predictor.fit(train, accuracy(train))
    low, high = table.latency_range(SPACE)
    budget = low + 0.4 * (high - low)
    result = evolution_search(SPACE, predictor, table, budget, queries=2000, population_size=100, seed=0,
                              costs=False)
    assert table.predict(result.best) <= budget
    truth = accuracy([result.best])[0]
    random_best = max(accuracy([a for a in sample(2000, seed=6) if table.predict(a) <= budget]))
    assert truth > random_best
