"""The derived arch of a differentiable search: the distribution's argmax, moved into the budget's band by choice steps.

While over the budget, the step down (one kernel, expand, depth or resolution choice to the next
smaller value) that costs the least log-probability per millisecond saved; while under the band,
the step up that fits and costs the least log-probability per millisecond gained (two or three
steps at once when no single one fits). The learned log-probability is the search's estimate of
what a choice is worth.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from hwnas.search.distribution import ArchDistribution, ExpectedLatency


class Repair:
    """Moves a gene row into the band [band * budget, budget] by single choice steps (see the module doc)."""

    def __init__(self, dist: ArchDistribution, latency: ExpectedLatency, budget_ms: float, band: float) -> None:
        self.dist, self.latency, self.budget, self.low = dist, latency, float(budget_ms), float(band) * budget_ms
        codec = dist.codec
        self.codec = codec
        # for each gene column, its choice indices sorted by value: a step up is the next larger value
        orders = [np.argsort(codec.res_choices)] + [np.argsort(codec.depth_choices)] * codec.stages \
            + [np.argsort(codec.kernel_choices)] * (codec.stages * codec.depth) \
            + [np.argsort(codec.expand_choices)] * (codec.stages * codec.depth)
        self.order = orders
        self.rank = [np.argsort(o) for o in orders]
        with torch.no_grad():
            lr, ld, lk, le = (t.numpy() for t in dist._log_probs())
        self.logp = (lr, ld, lk.reshape(codec.stages * codec.depth, -1), le.reshape(codec.stages * codec.depth, -1))
        self.present = dist.present.numpy().astype(bool)

    def log_prob(self, rows: np.ndarray) -> np.ndarray:
        codec, m = self.codec, self.codec.depth
        lr, ld, lk, le = self.logp
        dep = rows[:, 1:codec.k0]
        active = self.present[dep].reshape(len(rows), -1)
        slots = np.arange(codec.stages * m)[None, :]
        blocks = lk[slots, rows[:, codec.k0:codec.e0]] + le[slots, rows[:, codec.e0:]]
        return lr[rows[:, 0]] + ld[np.arange(codec.stages)[None, :], dep].sum(1) + (blocks * active).sum(1)

    def _columns(self, row: np.ndarray) -> list[int]:
        """Gene columns that change the network: resolution, depths, and the active slots."""
        codec, m = self.codec, self.codec.depth
        cols = list(range(codec.k0))
        for s in range(codec.stages):
            depth = codec.depth_choices[row[1 + s]]
            for i in range(depth):
                cols += [codec.k0 + s * m + i, codec.e0 + s * m + i]
        return cols

    def moves(self, row: np.ndarray, direction: int) -> tuple[np.ndarray, list[str]]:
        """Every row one choice step up (+1) or down (-1) from `row`, with a readable name for each."""
        rows, names = [], []
        for col in self._columns(row):
            rank = self.rank[col][row[col]] + direction
            if 0 <= rank < len(self.order[col]):
                new = row.copy()
                new[col] = self.order[col][rank]
                rows.append(new)
                names.append(self._name(col, row[col], new[col]))
        return (np.stack(rows) if rows else np.zeros((0, len(row)), dtype=np.int64)), names

    def _name(self, col: int, old: int, new: int) -> str:
        codec, m = self.codec, self.codec.depth
        if col == 0:
            return f"resolution {codec.res_choices[old]}->{codec.res_choices[new]}"
        if col < codec.k0:
            return f"depth[{col - 1}] {codec.depth_choices[old]}->{codec.depth_choices[new]}"
        if col < codec.e0:
            s, i = divmod(col - codec.k0, m)
            return f"kernel[{s}.{i}] {codec.kernel_choices[old]}->{codec.kernel_choices[new]}"
        s, i = divmod(col - codec.e0, m)
        return f"expand[{s}.{i}] {codec.expand_choices[old]:g}->{codec.expand_choices[new]:g}"

    def __call__(self, row: np.ndarray) -> tuple[np.ndarray, float, list[str]]:
        """The repaired row, its priced latency, and the steps taken."""
        row = np.asarray(row, dtype=np.int64).copy()
        lat = float(self.latency.price(row)[0])
        steps: list[str] = []
        while lat > self.budget:  # shrink: the least log-probability lost per millisecond saved
            rows, names = self.moves(row, -1)
            prices = self.latency.price(rows) if len(rows) else np.zeros(0)
            saved = lat - prices
            ok = saved > 0
            if not ok.any():
                fastest = self.latency.fastest()
                if fastest is None:
                    break
                row, lat = fastest, float(self.latency.price(fastest)[0])
                steps.append("fastest arch")
                break
            score = np.where(ok, (self.log_prob(rows) - self.log_prob(row[None])) / np.where(ok, saved, 1), -np.inf)
            j = int(np.argmax(score))
            row, lat = rows[j], float(prices[j])
            steps.append(names[j])
        while self.budget >= lat and lat < self.low:  # grow: the least log-probability lost per millisecond gained
            picked = None
            for changes in (1, 2, 3):  # single steps first; two or three at once when no single one fits
                rows, names = self.neighbours(row, changes)
                picked = self._best_growth(row, lat, rows, names)
                if picked is not None:
                    break
            if picked is None:
                break
            row, lat, name = picked
            steps.append(name)
        return row, lat, steps

    def neighbours(self, row: np.ndarray, changes: int) -> tuple[np.ndarray, list[str]]:
        """Rows `changes` choice steps from `row` in distinct columns (one step up or down each); 1: up only."""
        up, up_names = self.moves(row, +1)
        if changes == 1:
            return up, up_names
        down, down_names = self.moves(row, -1)
        steps = [(int(np.flatnonzero(r != row)[0]), r, n) for r, n in zip([*up, *down], [*up_names, *down_names],
                                                                        strict=True)]
        rows, names = [], []
        for combo in itertools.combinations(steps, changes):
            if len({col for col, _, _ in combo}) < changes or all(n in down_names for _, _, n in combo):
                continue  # one column twice, or only steps down (never gains latency)
            new = row.copy()
            for col, r, _ in combo:
                new[col] = r[col]
            rows.append(new)
            names.append(" & ".join(n for _, _, n in combo))
        return (np.stack(rows) if rows else np.zeros((0, len(row)), dtype=np.int64)), names

    def _best_growth(self, row: np.ndarray, lat: float, rows: np.ndarray, names: list[str]
                     ) -> tuple[np.ndarray, float, str] | None:
        if len(rows) == 0:
            return None
        prices = self.latency.price(rows)
        gained = prices - lat
        ok = (gained > 0) & (prices <= self.budget)
        if not ok.any():
            return None
        score = np.where(ok, (self.log_prob(rows) - self.log_prob(row[None])) / np.where(ok, gained, 1), -np.inf)
        j = int(np.argmax(score))
        return rows[j], float(prices[j]), names[j]
