"""`run_demo`: the whole product on the embedded default in a few minutes on a 2-core CPU.

Profile this CPU with ONNX Runtime for the small space (or reuse the committed table when its
fingerprint matches, re-timed for drift), load the shipped Fashion-MNIST supernet (or train one for
a few minutes), pick a budget, search it with constrained evolution, time the finalists here, export
the best to ONNX, verify it in ONNX Runtime and time it: the README's first command. It is a
composition of the library's own pipelines (`hwnas.latency.catalog`, `hwnas.search.pipeline`,
`hwnas.deploy`), so what it shows is what a user's own run does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwnas.errors import HwnasError
from hwnas.fileio import check_output_dir, display_path

if TYPE_CHECKING:
    from hwnas.deploy import DeployReport
    from hwnas.search.pipeline import SearchOutcome

Log = Callable[[str], None]
SPACE = "mbv3-32"
PROFILE = "cpu-onnxruntime"
SHIPPED_NAME = "mbv3-32_fashion-mnist.pt"
# The short recipe of --train-minutes: as many of 40 epochs as fit, small batches for a 2-core CPU.
QUICK_RECIPE: dict[str, Any] = {"epochs": 40, "batch_size": 128, "lr": 0.1, "num_sampled": 1, "warmup_epochs": 0.5,
                                "device": "cpu"}


def shipped_supernet() -> Path:
    """The Fashion-MNIST supernet shipped inside the package (hwnas/checkpoints/)."""
    return Path(__file__).resolve().parent / "checkpoints" / SHIPPED_NAME


VAL_BATCH = 500  # validation images per batch the demo's search scores


@dataclass
class DemoRequest:
    """The demo's knobs (`hwnas demo --help`): the budget (default: the median predicted latency of
    1000 random subnets), the supernet (default: the shipped one) or minutes to train one, and the
    size of the search."""

    budget_ms: float | None = None
    supernet: Path | None = None
    train_minutes: float | None = None
    data: str = "fashion-mnist"
    profile: str | Path = PROFILE
    queries: int = 48
    val_images: int = 1000
    margin: float = 0.0
    measure_top: int = 5
    drift: bool = True  # re-time a committed table's calibration subnets and scale its predictions to this run
    seed: int = 0
    out: Path = Path("results/demo")
    progress: bool = True

    def check(self) -> DemoRequest:
        from hwnas.search.pipeline import check_margin

        if self.queries < 4 or self.measure_top < 0:
            raise HwnasError(f"--queries must be >= 4 and --measure-top >= 0, got {self.queries} and "
                             f"{self.measure_top}")
        check_margin(self.margin)
        if self.val_images < VAL_BATCH or self.val_images % VAL_BATCH:
            raise HwnasError(f"--val-images must be a positive multiple of {VAL_BATCH} (the search scores batches "
                             f"of {VAL_BATCH}), got {self.val_images}")
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise HwnasError(f"--budget-ms must be a positive number of milliseconds, got {self.budget_ms:g}")
        if self.train_minutes is not None and not (math.isfinite(self.train_minutes) and self.train_minutes > 0):
            raise HwnasError(f"--train-minutes must be a positive number of minutes, got {self.train_minutes:g}")
        return self


@dataclass
class DemoOutcome:
    """What the demo searched and shipped."""

    budget_ms: float
    search: SearchOutcome
    report: DeployReport
    validation_images: int
    minutes: float


def run_demo(request: DemoRequest, *, log: Log = print, warn: Log = print) -> DemoOutcome:
    """Profile (or reuse), search, export, verify and time; `log` gets the five steps' lines."""
    from hwnas import spaces
    from hwnas.checkpoint import load_supernet
    from hwnas.data import load_dataset
    from hwnas.deploy import deploy
    from hwnas.latency.catalog import table_for_device
    from hwnas.latency.drift import apply_drift, check_drift
    from hwnas.latency.profiles import load_profile
    from hwnas.latency.quiet import QuietGuard
    from hwnas.search import check_budget
    from hwnas.search.measured import describe_pick
    from hwnas.search.pipeline import SearchRequest, run_search

    clock = time.perf_counter()
    request.check()
    out = check_output_dir(request.out)
    space = spaces.get(SPACE)
    profile = load_profile(request.profile)
    # every input is read before the first timing: a bad checkpoint or dataset is one line, not minutes later
    dataset = load_dataset(request.data, val_size=5000, seed=0)
    shipped: tuple[Any, dict[str, Any]] | None = None
    if request.train_minutes is None:
        ckpt = request.supernet or shipped_supernet()
        if not ckpt.is_file():
            raise HwnasError(f"{ckpt}: no supernet checkpoint; pass --supernet CKPT or --train-minutes N")
        shipped = load_supernet(ckpt, space_name=SPACE)

    log(f"[1/5] latency table ({profile.name}: {profile.description})")
    guard = QuietGuard(policy="warn", max_wait_s=20.0, log=lambda line: warn(line.strip().removeprefix("warning: ")))
    table, committed = table_for_device(space, profile, out, progress=request.progress, log=log, guard=guard)
    if committed and request.drift:  # the fingerprint matched, but a shared machine's speed wanders: check it now
        table = apply_drift(table, check_drift(table, guard=guard), correct=True, log=log, warn=warn,
                            label="  drift: ")

    log("[2/5] supernet")
    if request.train_minutes is not None:
        from hwnas.recipe import TrainConfig
        from hwnas.train import train_supernet  # the demo is the one pipeline that trains

        ckpt = train_supernet(space, dataset, TrainConfig(**QUICK_RECIPE), out / "train", resume=True,
                              progress=request.progress, time_budget=request.train_minutes * 60)
        shipped = load_supernet(ckpt, space_name=SPACE)
    assert shipped is not None  # loaded above, or just trained
    supernet, state = shipped
    log(f"  {display_path(ckpt)} ({state.get('dataset', '?')}, epoch {state.get('epoch', '?')})")

    log("[3/5] budget")
    feasible = check_budget(space, table, request.budget_ms if request.budget_ms is not None else 1e9,
                            seed=request.seed)
    if request.budget_ms is None:
        rng = np.random.default_rng(request.seed)
        budget = float(f"{float(np.median(table.predict_many([space.sample(rng) for _ in range(1000)]))):.3g}")
        log(f"  {budget:g} ms: the median predicted latency of 1000 random subnets (feasible "
            f"{feasible.describe()}); --budget-ms overrides")
    else:
        budget = float(request.budget_ms)
        log(f"  {budget:g} ms (given); feasible {feasible.describe()}")
    target = budget * (1 - request.margin)
    if request.margin:
        check_budget(space, table, target, seed=request.seed)
        log(f"  searched under {target:.4g} ms: a margin of {request.margin:g} for the table's error and this "
            "device's noise")

    log(f"[4/5] search: constrained evolution, {request.queries} supernet evaluations on {request.val_images} "
        "validation images")
    run = run_search(SearchRequest(
        supernet=ckpt, tables=[table], budgets_ms=[budget], strategy="evolution", queries=request.queries,
        population=max(4, min(16, request.queries // 3)), data=dataset, val_size=5000,
        val_batches=request.val_images // VAL_BATCH, batch_size=VAL_BATCH, bn_batches=4, bn_batch_size=256,
        out=out / "search", force=True, seed=request.seed, margin=request.margin, measure_top=request.measure_top,
        device="cpu", progress=request.progress), log=lambda line: None, warn=lambda line: None)
    outcome = run.outcomes[0]
    result, record = outcome.result, outcome.record
    if "measured_pick" in result.info:
        log(f"  {describe_pick(result)}")
    if result.best is None or record.accuracy is None:
        raise HwnasError(f"the search found no subnet within {target:g} ms")
    log(f"  best {record.arch_id}: predicted {record.predicted_latency_ms:.4g} ms, validation accuracy "
        f"{record.accuracy:.2f} % ({len(result.candidates)} candidates; {outcome.directory})")

    log("[5/5] export, verify and measure")
    report = deploy(supernet, result.best, out / "export", dataset=dataset, settings=record.eval_settings,
                    profile=profile, table=table, budget_ms=budget, search_accuracy=record.accuracy,
                    metadata={"source": str(ckpt), "search": str(outcome.directory)}, log=log, guard=guard)
    return DemoOutcome(budget_ms=budget, search=outcome, report=report,
                       validation_images=int(record.validation_images or 0),
                       minutes=(time.perf_counter() - clock) / 60)


__all__ = ["DemoOutcome", "DemoRequest", "QUICK_RECIPE", "run_demo", "shipped_supernet"]
