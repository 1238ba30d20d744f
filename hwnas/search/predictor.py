"""An accuracy predictor on `space.encode(arch)`: ridge regression or a small MLP, judged by Kendall tau.

Once-for-All scores 50k candidates with an MLP on the arch encoding instead of the supernet. Here
`fit` holds out a share of the (arch, accuracy) pairs, reports Kendall tau on them (ranking is
what a search needs, not absolute accuracy), then refits on all pairs. `kind="auto"` fits both
models on the same split and keeps the one that ranks the held-out pairs better.

Prediction is numpy only (the MLP's weights are copied out of torch after training), with a
batched one-hot encoder where the space has one (`encode_many`), so `evaluate_many` on a generation of 100 archs
costs well under a millisecond of model time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.search.protocols import EncodableSpace

KINDS = ("auto", "ridge", "mlp")
ALPHAS = np.logspace(-3, 3, 25)


def kendall_tau(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b between two scorings of the same archs (nan for fewer than 2)."""
    from scipy.stats import kendalltau

    if len(a) < 2:
        return float("nan")
    return float(kendalltau(np.asarray(a), np.asarray(b)).statistic)


class BatchEncoder:
    """`space.encode` for many archs at once: the space's own `encode_many` where it has one (a
    `SearchSpace` gathers every arch's one-hot columns in one pass, `hwnas.genes.OneHotEncoder`),
    else arch by arch."""

    def __init__(self, space: EncodableSpace) -> None:
        self.space = space
        self.size = int(space.encoding_size)
        many = getattr(space, "encode_many", None)
        self.fast = callable(many)
        self._many = many

    def __call__(self, archs: Sequence[Any]) -> np.ndarray:
        if not len(archs):
            return np.zeros((0, self.size), dtype=np.float32)
        if self._many is not None and self.fast:
            return np.asarray(self._many(archs), dtype=np.float32)
        return np.stack([np.asarray(self.space.encode(a), dtype=np.float32) for a in archs])


@dataclass
class PredictorFit:
    """How well the predictor ranks pairs it was not fitted on."""

    kind: str
    kendall_tau: float
    n_train: int
    n_holdout: int
    mae: float
    taus: dict[str, float] = field(default_factory=dict)
    refit: bool = True

    def describe(self) -> str:
        return (f"{self.kind} predictor: Kendall tau {self.kendall_tau:.3f} on {self.n_holdout} held-out archs "
                f"(fitted on {self.n_train}), MAE {self.mae:.3g}")


class _Ridge:
    """Ridge regression with the penalty chosen by exact leave-one-out error (closed form via SVD)."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Ridge:
        x = x.astype(np.float64)
        self.mean_x = x.mean(axis=0)
        self.mean_y = float(y.mean())
        xc, yc = x - self.mean_x, y - self.mean_y
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        uty = u.T @ yc
        best = (np.inf, ALPHAS[0])
        for alpha in ALPHAS:
            shrink = s**2 / (s**2 + alpha)
            fitted = u @ (shrink * uty)
            hat = (u**2) @ shrink + 1.0 / len(y)
            loo = (yc - fitted) / np.maximum(1.0 - hat, 1e-9)
            err = float(np.mean(loo**2))
            if err < best[0]:
                best = (err, alpha)
        self.alpha = float(best[1])
        self.coef = vt.T @ (s / (s**2 + self.alpha) * uty)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_x) @ self.coef + self.mean_y


# A search scores a generation (about 100 archs) at a time: for matrices that small, OpenBLAS's threads cost more
# than they share (1-8 ms a call on the 2-vCPU VM with a busy neighbour, 0.2 ms on one thread), so batches up to
# this many rows run on one.
ONE_THREAD_ROWS = 4096


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """A context in which numpy's BLAS runs one thread (threadpoolctl; a no-op where it is missing)."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


class _MLP:
    """Two hidden ReLU layers trained with Adam on standardised targets; inference in numpy."""

    def __init__(self, hidden: int = 128, epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-4,
                 seed: int = 0) -> None:
        self.hidden, self.epochs, self.lr, self.weight_decay, self.seed = hidden, epochs, lr, weight_decay, seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> _MLP:
        import torch
        from torch import nn

        self.mean_y, self.std_y = float(y.mean()), float(y.std()) or 1.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = nn.Sequential(nn.Linear(x.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden),
                                nn.ReLU(), nn.Linear(self.hidden, 1))
            xt = torch.as_tensor(x, dtype=torch.float32)
            yt = torch.as_tensor((y - self.mean_y) / self.std_y, dtype=torch.float32)[:, None]
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)
            batch = min(len(xt), 128)
            for _ in range(self.epochs):
                order = torch.randperm(len(xt))
                for start in range(0, len(xt), batch):
                    idx = order[start:start + batch]
                    loss = nn.functional.mse_loss(net(xt[idx]), yt[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
        layers = [m for m in net if isinstance(m, nn.Linear)]
        self.weights = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in layers]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32, copy=False)
        for i, (w, b) in enumerate(self.weights):
            h = h @ w + b
            if i < len(self.weights) - 1:
                np.maximum(h, 0, out=h)
        return h[:, 0].astype(np.float64) * self.std_y + self.mean_y


class AccuracyPredictor:
    """Predicted accuracy of archs of `space`; an `AccuracyEvaluator` with a vectorised `evaluate_many`."""

    def __init__(self, space: EncodableSpace, kind: str = "auto", *, hidden: int = 128, epochs: int = 300,
                 seed: int = 0) -> None:
        if kind not in KINDS:
            raise HwnasError(f"predictor kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.space = space
        self.kind = kind
        self.hidden, self.epochs, self.seed = hidden, epochs, seed
        self.encoder = BatchEncoder(space)
        self.model: _Ridge | _MLP | None = None
        self.fit_report: PredictorFit | None = None

    def _make(self, kind: str) -> _Ridge | _MLP:
        return _Ridge() if kind == "ridge" else _MLP(self.hidden, self.epochs, seed=self.seed)

    def fit(self, archs: Sequence[Any], accuracies: Sequence[float] | np.ndarray, *, holdout: float = 0.2,
            refit: bool = True) -> PredictorFit:
        """Fit on (arch, accuracy) pairs; Kendall tau is measured on a held-out share of them.

        With `refit` (the default) the final model is fitted on all pairs, so the reported tau is
        that of a model fitted on fewer pairs: slightly pessimistic, never flattering.
        """
        y = np.asarray(accuracies, dtype=np.float64)
        if len(archs) != len(y):
            raise HwnasError(f"predictor: {len(archs)} archs but {len(y)} accuracies")
        if len(y) < 5:
            raise HwnasError(f"predictor: need at least 5 (arch, accuracy) pairs, got {len(y)}")
        if not 0 < holdout < 1:
            raise HwnasError(f"predictor: holdout must lie in (0, 1), got {holdout}")
        x = self.encoder(archs)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(y))
        n_hold = min(max(2, round(holdout * len(y))), len(y) - 3)
        test, train = order[:n_hold], order[n_hold:]
        kinds = ("ridge", "mlp") if self.kind == "auto" else (self.kind,)
        taus: dict[str, float] = {}
        models: dict[str, tuple[_Ridge | _MLP, float]] = {}
        for kind in kinds:
            model = self._make(kind).fit(x[train], y[train])
            pred = model.predict(x[test])
            taus[kind] = kendall_tau(pred, y[test])
            models[kind] = (model, float(np.mean(np.abs(pred - y[test]))))
        # the better ranker; on a tie (or nan) the simpler ridge
        chosen = max(kinds, key=lambda k: (np.nan_to_num(taus[k], nan=-2.0), k == "ridge"))
        model, mae = models[chosen]
        if refit:
            model = self._make(chosen).fit(x, y)
        self.model = model
        self.fit_report = PredictorFit(kind=chosen, kendall_tau=taus[chosen], n_train=len(train), n_holdout=n_hold,
                                       mae=mae, taus=taus, refit=refit)
        return self.fit_report

    @property
    def kendall_tau(self) -> float | None:
        return None if self.fit_report is None else self.fit_report.kendall_tau

    def evaluate_many(self, archs: Sequence[Any]) -> np.ndarray:
        if self.model is None:
            raise HwnasError("the accuracy predictor is not fitted: call fit() first")
        if len(archs) == 0:
            return np.zeros(0)
        x = self.encoder(archs)
        if len(x) > ONE_THREAD_ROWS:
            return self.model.predict(x)
        with _one_blas_thread():
            return self.model.predict(x)

    def evaluate(self, arch: Any) -> float:
        return float(self.evaluate_many([arch])[0])
