"""`SearchRequest`: what `hwnas search` is asked to do, checked before anything is loaded.

Kept apart from `hwnas.search.pipeline` (which carries it out) so that the options, their
validation and the reading of `--table CSV:MS,MS` are one concept: a request is refused in one
line naming the option, before a checkpoint, a table or a dataset is read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwnas.data.readers import check_val_size
from hwnas.errors import HwnasError
from hwnas.search import get_strategy

if TYPE_CHECKING:
    from hwnas.data import Dataset

DRIFT_MODES = ("off", "warn", "correct")


@dataclass
class SearchRequest:
    """What to search: a supernet checkpoint, latency tables (paths or loaded tables) and budgets, and how.

    One search runs per (table, budget); with more than one they form a family under `out`. The
    fields mirror `hwnas search`'s options (its --help says what each does); `check()` refuses
    values that cannot work, in one line naming the option.
    """

    budgets_ms: Sequence[float]  # every table's budgets, unless `table_budgets_ms` gives a table its own
    supernet: Path | None = None  # a trained supernet scores the archs; or `evaluator`
    tables: Sequence[str | Path | Any] = ()  # latency tables (paths, or loaded LatencyTables); or `latency`
    # per table (aligned with `tables`): its own budgets (a CPU and a GPU rarely share one), or None for
    # `budgets_ms`; empty: every table takes `budgets_ms` (CLI: --table CPU.csv:2,4 GPU.csv:0.3)
    table_budgets_ms: Sequence[Sequence[float] | None] = ()
    space: str | None = None  # a preset or package.module:factory; default: the supernet's own
    evaluator: Any = None  # package.module:factory (called with the space) or an AccuracyEvaluator
    latency: Any = None  # package.module:factory (called with the space) or a LatencyModel
    strategy: str = "evolution"
    queries: int = 200
    population: int | None = None
    steps: int | None = None  # differentiable only
    reward: str | None = None  # differentiable only
    finetune: bool = False  # differentiable only
    data: str | Dataset | None = None  # default: the dataset the checkpoint was trained on
    val_size: int | float | None = None  # None: the split the checkpoint was trained with (5000 if it says none)
    val_batches: int | None = None
    batch_size: int = 500
    bn_batches: int = 8
    bn_batch_size: int = 256
    predictor: bool = False
    predictor_kind: str = "auto"
    predictor_queries: int = 10000
    confirm: int | None = None
    seed_from: Path | None = None
    out: Path | None = None
    force: bool = False
    resume: bool = False
    seed: int = 0
    allow_mismatch: bool = False
    margin: float = 0.0
    measure_top: int = 0
    drift: str = "off"
    device: str = "auto"
    progress: bool = True
    time_limit: float | None = None  # seconds per search (each stops at its next generation once over)
    patience: int | None = None  # evolution / nsga: stop after this many generations without a better arch

    def check(self) -> SearchRequest:
        """Refuse settings that cannot work, before anything is loaded or evaluated."""
        for name in ("queries", "batch_size", "bn_batches", "bn_batch_size", "predictor_queries"):
            if getattr(self, name) < 1:
                raise HwnasError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        check_val_size(self.val_size)
        for name, least in (("population", 2), ("val_batches", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise HwnasError(f"--{name.replace('_', '-')} is too small: {value}")
        check_margin(self.margin)
        if self.measure_top < 0:
            raise HwnasError(f"--measure-top must be >= 0, got {self.measure_top}")
        if self.drift not in DRIFT_MODES:
            raise HwnasError(f"--drift must be one of {', '.join(DRIFT_MODES)}, got {self.drift!r}")
        if self.confirm is not None and not 1 <= self.confirm < self.queries:
            raise HwnasError(f"--confirm must lie in 1..queries-1 ({self.queries - 1}), got {self.confirm}")
        if self.predictor and self.queries < 10:
            raise HwnasError(f"--predictor needs --queries >= 10 (training pairs plus confirmations), "
                             f"got {self.queries}")
        given = [name for name in ("steps", "reward") if getattr(self, name) is not None] + \
            (["finetune"] if self.finetune else [])
        if given and self.strategy != "differentiable":
            raise HwnasError(f"--{given[0]} applies to --strategy differentiable only")
        if self.steps is not None and self.steps < 0:
            raise HwnasError(f"--steps must be >= 0, got {self.steps}")
        if self.finetune and (self.predictor or self.reward == "evaluator"):
            raise HwnasError("--finetune scores subnets on batches with the weights it trains: it takes neither "
                             "--predictor nor --reward evaluator")
        if self.finetune and self.resume:
            raise HwnasError("--finetune changes the shared weights as it searches, so a killed run cannot be "
                             "replayed: it takes no --resume (run it again with --force)")
        if self.table_budgets_ms and len(self.table_budgets_ms) != len(self.tables):
            raise HwnasError(f"table_budgets_ms has {len(self.table_budgets_ms)} entries for {len(self.tables)} tables")
        for table, own in zip(self.tables, self.table_budgets_ms or [None] * len(self.tables), strict=True):
            if own is None and not self.budgets_ms:
                raise HwnasError(f"no budget for table {_label(table)}: give it its own (--table "
                                 f"{_label(table)}:MS[,MS...]) or --budget-ms for every table")
            for budget in own or ():
                if not math.isfinite(float(budget)) or float(budget) <= 0:
                    raise HwnasError(f"table {_label(table)}: a budget must be a positive number of "
                                     f"milliseconds, got {budget!r}")
        if self.latency is not None and not self.budgets_ms:
            raise HwnasError("--latency needs --budget-ms (its budgets)")
        if not self.tables and self.latency is None and not self.budgets_ms:
            raise HwnasError("a search needs at least one budget (--budget-ms)")
        if (self.supernet is None) == (self.evaluator is None):
            raise HwnasError("give --supernet CKPT (the archs are scored on it) or --evaluator MODULE:FACTORY "
                             "(your own), one of the two")
        if not self.tables and self.latency is None:
            raise HwnasError("give --table CSV (a latency table) or --latency MODULE:FACTORY (your own latency model)")
        if self.evaluator is not None and self.space is None:
            raise HwnasError("--evaluator needs --space (a preset or package.module:factory): there is no supernet "
                             "to take the space from")
        if self.latency is not None and (self.drift != "off" or self.measure_top):
            raise HwnasError("--drift and --measure-top time subnets on the device of a latency table; a latency "
                             "model of your own (--latency) has no device to time on")
        if self.evaluator is not None and (self.finetune or self.reward == "batch"):
            raise HwnasError("--finetune and --reward batch train or score a supernet's weights: they need --supernet")
        if self.patience is not None and (self.patience < 1 or self.strategy not in ("evolution", "nsga")):
            raise HwnasError(f"--patience needs evolution or nsga and at least 1 generation, got {self.patience} "
                             f"with {self.strategy}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise HwnasError(f"--time-limit must be a positive number of seconds, got {self.time_limit}")
        get_strategy(self.strategy)
        return self

    def budgets_of(self, index: int) -> list[float]:
        """The budgets (ms) searched under table `index` (the latency model's: index == len(tables))."""
        own = self.table_budgets_ms[index] if index < len(self.table_budgets_ms) else None
        return [float(b) for b in (own if own is not None else self.budgets_ms)]

    def pairs(self) -> int:
        """How many (table, budget) searches the request holds."""
        models = len(self.tables) + (self.latency is not None)
        return sum(len(self.budgets_of(i)) for i in range(models))

    @property
    def family(self) -> bool:
        return self.pairs() > 1

    def out_dir(self) -> Path:
        """`out`, or results/<strategy>-<budget>ms-seed<S> (results/<strategy>-family-seed<S> for a family)."""
        if self.out is not None:
            return Path(self.out)
        name = f"{self.strategy}-family-seed{self.seed}" if self.family else \
            f"{self.strategy}-{self.budgets_of(0)[0]:g}ms-seed{self.seed}"
        return Path("results") / name


def _label(table: Any) -> str:
    """A table as its user named it, for messages."""
    path = getattr(table, "path", None)
    return str(path if path is not None else table)


def parse_table_budgets(value: str) -> tuple[Path, list[float] | None]:
    """`--table` values: `T.csv` (the --budget-ms budgets) or `T.csv:MS[,MS...]` (its own budgets).

    The suffix after the last colon counts as budgets only when it reads as numbers, so a path holding
    a colon still works.
    """
    path, sep, tail = value.rpartition(":")
    if not sep or not tail or not path:
        return Path(value), None
    try:
        budgets = [float(part) for part in tail.split(",")]
    except ValueError:
        if tail[0] not in "0123456789.-+":  # a colon inside the path itself
            return Path(value), None
        raise HwnasError(f"--table {value}: the budgets after ':' must be milliseconds such as "
                         f"{path}:0.5,1.0") from None
    for budget in budgets:
        if not math.isfinite(budget) or budget <= 0:
            raise HwnasError(f"--table {value}: a budget must be a positive number of milliseconds, got {budget:g}")
    return Path(path), budgets


def check_margin(margin: float) -> None:
    """A guard band is a fraction of the budget; above half it would leave no search."""
    if not 0.0 <= margin < 0.5:
        raise HwnasError(f"--margin is a fraction of the budget in [0, 0.5), got {margin}")
