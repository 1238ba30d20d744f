"""Cut a searched arch out of a supernet and ship it: BN re-estimation, accuracy, export, measured latency.

The promise of a weight-sharing search is that the subnet it picked is deployable as it is. That
only holds when the exported model sees the same BN statistics the search scored it with, so the
subnet is re-estimated here exactly as `SupernetEvaluator` does (same training batches, same
seed) and its validation accuracy is recomputed: a mismatch with the search's figure shows at
once. The exported file is then timed the way the profiler times (the profile's runtime, threads,
warm-up and repeats) and set beside the table's prediction and the budget, because a table is a
model of the device and only a measurement of the artifact says whether it meets the budget.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hwnas.errors import HwnasError
from hwnas.space import Arch

if TYPE_CHECKING:
    from hwnas.data import Dataset, Split
    from hwnas.latency.backends import Timing
    from hwnas.latency.profiles import DeviceProfile
    from hwnas.latency.table import LatencyTable
    from hwnas.supernet import Supernet

REPORT_NAME = "deploy.json"


@dataclass(frozen=True)
class EvalSettings:
    """How the search scored an arch; the export repeats it so both see the same BN statistics."""

    bn_batches: int = 8
    bn_batch_size: int = 256
    seed: int = 0
    batch_size: int = 500
    val_batches: int | None = None  # cap on validation batches, as `hwnas search --val-batches`

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalSettings:
        """The settings a search wrote into best.json (defaults for what it did not record)."""
        out = cls()
        kwargs = {}
        for name in ("bn_batches", "bn_batch_size", "seed", "batch_size", "val_batches"):
            value = record.get(name, getattr(out, name))
            kwargs[name] = None if value is None else int(value)
        return cls(**kwargs)


@dataclass
class DeployReport:
    """What an export produced and what was measured on it; written as deploy.json beside the files."""

    arch: dict[str, Any]
    arch_id: str
    onnx_path: str
    opset: int
    ort_max_abs_diff: float
    dataset: str | None = None
    val_accuracy: float | None = None  # torch, validation split, the search's BN settings
    search_accuracy: float | None = None  # what the search reported for this arch
    test_accuracy_torch: float | None = None
    test_accuracy_ort: float | None = None
    predicted_ms: float | None = None
    budget_ms: float | None = None
    profile: str | None = None
    measured_ms: float | None = None  # the profile's statistic of end-to-end runs of the exported artifact
    measured_p10_ms: float | None = None
    measured_p90_ms: float | None = None
    measured_artifact: str | None = None
    measured_rounds_ms: list[float] = field(default_factory=list)  # each round's statistic; the lowest is kept
    table: str | None = None
    table_drift: float | None = None  # the factor the prediction was scaled by (hwnas search --drift correct)
    drift_when_over: float | None = None  # over budget: the table's calibration subnets, re-timed now / then
    engine_path: str | None = None
    engine_settings: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        return self.budget_ms is not None and self.measured_ms is not None and self.measured_ms > self.budget_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recalibrated_subnet(supernet: Supernet, arch: Arch, train: Split, settings: EvalSettings) -> nn.Module:
    """The static subnet of `arch` on the CPU, BN re-estimated on the search's seeded training batches."""
    from hwnas.supernet.bn import recalibrate_bn
    from hwnas.train import calibration_batches

    cpu = torch.device("cpu")
    module = supernet.extract(arch).to(cpu)
    recalibrate_bn(module, calibration_batches(train, arch.resolution, batch_size=settings.bn_batch_size,
                                               n_batches=settings.bn_batches, device=cpu, seed=settings.seed))
    return module.eval()


def torch_accuracy(module: nn.Module, split: Split, resolution: int, *, batch_size: int = 500,
                   max_batches: int | None = None) -> float:
    """Accuracy (%) in torch on the CPU, as the search's evaluator computes it."""
    from hwnas.train import evaluate

    correct, total = evaluate(module, split, resolution, device=torch.device("cpu"), batch_size=batch_size,
                              max_batches=max_batches)
    return 100.0 * correct / max(total, 1)


def ort_accuracy(onnx_path: str | Path, split: Split, resolution: int, *, batch_size: int = 500,
                 max_batches: int | None = None, threads: int | None = None) -> float:
    """Accuracy (%) of the exported file in ONNX Runtime on the same images and preprocessing as torch."""
    from exporters.onnx import ort_predict, ort_session

    session = ort_session(onnx_path, threads=threads)
    correct = total = 0
    for x, y in split.batches(batch_size, resolution=resolution, max_batches=max_batches):
        logits = ort_predict(session, x.numpy(), batch_size)
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)


def measure_onnx(onnx_path: str | Path, profile: DeviceProfile, input_shape: tuple[int, int, int]) -> Timing:
    """End-to-end latency of an ONNX file in ONNX Runtime, with the profile's threads, batch, warm-up and repeats."""
    from exporters.onnx import ort_session
    from hwnas.latency.backends import Timing, time_calls

    session = ort_session(onnx_path, threads=profile.threads, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    feed = {inp.name: np.random.default_rng(0).standard_normal((profile.batch_size, *input_shape)).astype(np.float32)}
    outputs = [o.name for o in session.get_outputs()]
    return Timing.from_samples(time_calls(lambda: session.run(outputs, feed), profile.warmup, profile.repeats))


MEASURE_ROUNDS = 16
ROUND_GAP_S = 0.5


def measure_artifact(profile: DeviceProfile, module: nn.Module, onnx_path: Path, input_shape: tuple[int, int, int],
                     engine_path: Path | None = None, rounds: int = MEASURE_ROUNDS,
                     gap_s: float = ROUND_GAP_S) -> tuple[Timing, str, list[float]]:
    """Time what ships on the profile's backend: the ONNX file for ONNX Runtime, the engine for TensorRT,
    the module itself for the torch backends (whose deployment is the torch model).

    Measured the way the table was: in several rounds spread over time, each with a new session,
    the quietest kept (`combine_timings`), as the profiler keeps the quietest of its interleaved
    rounds. On the 2-vCPU development VM one ONNX Runtime model ran in either of two modes, about
    1.9x apart, switching from one second to the next whether the session was new or kept (pinning
    the thread did not settle it), the slow one up to three rounds in four; the table holds the
    quiet mode, so one back-to-back run would compare a noisy moment with a quiet table. The slow
    mode also came in spells of several seconds: 16 rounds 0.1 s apart once all landed in one
    (1.7x the quiet time timed seconds before), so the rounds are spread over about 10 s. Every
    round's statistic is returned and written to deploy.json, so the spread is reported rather
    than hidden.
    """
    from hwnas.latency.profiler import combine_timings

    once, artifact = _timer(profile, module, onnx_path, input_shape, engine_path)
    timings = []
    for i in range(max(1, rounds)):
        if i:
            time.sleep(gap_s)
        timings.append(once())
    return combine_timings(timings, profile.statistic), artifact, [t.value(profile.statistic) for t in timings]


def _timer(profile: DeviceProfile, module: nn.Module, onnx_path: Path, input_shape: tuple[int, int, int],
           engine_path: Path | None) -> tuple[Callable[[], Timing], str]:
    """One round of timing of the artifact the profile deploys, and what that artifact is."""
    if profile.backend == "onnxruntime-cpu":
        return (lambda: measure_onnx(onnx_path, profile, input_shape)), str(onnx_path)
    if profile.backend == "tensorrt":
        if engine_path is None:
            raise HwnasError(f"profile '{profile.name}' times TensorRT engines: export with --format tensorrt")
        from exporters.tensorrt import EngineRunner
        from hwnas.latency.backends import Timing, cuda_event_samples

        runner = EngineRunner(engine_path, batch_size=profile.batch_size)
        x = torch.randn(profile.batch_size, *input_shape, device="cuda")

        def engine_round() -> Timing:
            samples = cuda_event_samples(lambda: runner(x), profile.warmup, profile.repeats, torch.device("cuda"))
            return Timing.from_samples(samples)

        return engine_round, str(engine_path)
    from hwnas.latency.backends import get_backend

    backend = get_backend(profile)
    return (lambda: backend.time_module(module, input_shape)), f"torch module ({profile.backend})"


def _drift_now(table: LatencyTable | None, profile: DeviceProfile) -> float | None:
    """Over budget on the table's own device: how much slower it runs the table's calibration subnets now.

    Tells a device that slowed down since profiling (re-profile, or search with --drift correct)
    from a table that is wrong for this arch. None where it cannot be told (another device, no
    calibration subnets).
    """
    if table is None or table.path is None:
        return None
    from hwnas.latency.drift import check_drift

    try:
        return check_drift(table, profile).factor
    except HwnasError:
        return None


def _drift_note(factor: float | None, table: LatencyTable | None) -> str:
    if factor is None or table is None:
        return ""
    assumed = f" (the prediction assumed {table.drift_factor:.2f}x)" if table.drifted else ""
    return (f"; this device runs the table's calibration subnets at {factor:.2f}x their profiled time now"
            f"{assumed}: 'hwnas latency drift', or search with --drift correct")


def deploy(supernet: Supernet, arch: Arch, out_dir: str | Path, *, dataset: Dataset | None = None,
           settings: EvalSettings = EvalSettings(), profile: DeviceProfile | None = None,
           table: LatencyTable | None = None, budget_ms: float | None = None, search_accuracy: float | None = None,
           tensorrt: str | None = None, opset: int = 17, test_batches: int | None = None,
           metadata: Mapping[str, str] | None = None, simplify: bool = True, log: Any = print) -> DeployReport:
    """Export `arch` from `supernet` to OUT_DIR and verify it; returns its `DeployReport` (and OUT_DIR/deploy.json).

    With `dataset`, BN is re-estimated as the search did and the accuracy is measured on the
    validation split (to compare with `search_accuracy`) and on the test split in torch and in
    ONNX Runtime; without it the subnet keeps the supernet's BN statistics (a pipeline check).
    `profile` times the exported artifact; `table` predicts its latency; `tensorrt` ("fp16" or
    "int8") also builds an engine, int8 calibrated on training images.
    """
    from exporters.onnx import export_onnx, set_metadata

    space = supernet.space
    space.validate(arch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = space.input_shape(arch)
    started = time.perf_counter()
    warnings: list[str] = []

    if dataset is not None:
        module = recalibrated_subnet(supernet, arch, dataset.train, settings)
        val_acc = torch_accuracy(module, dataset.val, arch.resolution, batch_size=settings.batch_size,
                                 max_batches=settings.val_batches)
        test_acc = torch_accuracy(module, dataset.test, arch.resolution, batch_size=settings.batch_size,
                                  max_batches=test_batches)
        log(f"  accuracy (torch, BN re-estimated on {settings.bn_batches}x{settings.bn_batch_size} training images): "
            f"validation {val_acc:.2f} %, test {test_acc:.2f} %")
        if search_accuracy is not None and abs(val_acc - search_accuracy) > 0.1:
            warnings.append(f"validation accuracy {val_acc:.2f} % differs from the search's {search_accuracy:.2f} % "
                            "by more than 0.1 point (another dataset split or BN setting than the search's?)")
    else:
        module = supernet.extract(arch).eval()
        val_acc = test_acc = None

    predicted = table.predict(arch) if table is not None else None
    props = {"source": str(metadata.get("source", "")) if metadata else ""}
    props.update({k: str(v) for k, v in (metadata or {}).items()})
    for key, value in (("predicted_latency_ms", predicted), ("budget_ms", budget_ms), ("val_accuracy", val_acc),
                       ("test_accuracy_torch", test_acc), ("search_accuracy", search_accuracy)):
        if value is not None:
            props[key] = f"{value:.6g}"
    if table is not None:
        props.update(table_device=table.device_slug, table_profile=str((table.profile_dict or {}).get("name")))
    if dataset is not None:
        props.update(dataset=dataset.spec or dataset.name, bn_batches=str(settings.bn_batches),
                     bn_batch_size=str(settings.bn_batch_size), bn_seed=str(settings.seed))
    onnx_path = out_dir / f"{space.name}_{arch.arch_id}.onnx"
    export = export_onnx(module, arch, onnx_path, input_shape=shape, opset=opset, metadata=props, simplify=simplify)
    log(f"  onnx: {export.path} (opset {export.opset}, onnx.checker passed, ONNX Runtime vs torch max abs diff "
        f"{export.max_abs_diff:.2e})")

    ort_acc = None
    if dataset is not None:
        ort_acc = ort_accuracy(export.path, dataset.test, arch.resolution, batch_size=settings.batch_size,
                               max_batches=test_batches)
        set_metadata(export.path, {"test_accuracy_ort": f"{ort_acc:.6g}"})
        log(f"  accuracy (ONNX Runtime, test): {ort_acc:.2f} %")
        if test_acc is not None and abs(ort_acc - test_acc) > 0.1:
            warnings.append(f"ONNX Runtime's test accuracy {ort_acc:.2f} % differs from torch's {test_acc:.2f} %")

    engine_path = settings_path = None
    if tensorrt is not None:
        from exporters.tensorrt import build_engine

        calibration = None
        if tensorrt == "int8":
            if dataset is None:
                raise HwnasError("an int8 engine needs calibration images: give the dataset (--data)")
            calibration = [x.numpy() for x, _ in dataset.train.batches(
                8, resolution=arch.resolution, shuffle=True, seed=settings.seed, max_batches=64)]
        build = build_engine(export.path, export.path.with_suffix(f".{tensorrt}.engine"), precision=tensorrt,
                             calibration_batches=calibration, timing_cache=out_dir / "timing.cache")
        engine_path, settings_path = build.engine_path, build.settings_path
        log(f"  engine: {engine_path} ({tensorrt}, built in {build.build_seconds:.1f} s; settings {settings_path})")

    report = DeployReport(
        arch=json.loads(arch.to_json()), arch_id=arch.arch_id, onnx_path=str(export.path), opset=export.opset,
        ort_max_abs_diff=export.max_abs_diff, dataset=(dataset.spec or dataset.name) if dataset else None,
        val_accuracy=val_acc, search_accuracy=search_accuracy, test_accuracy_torch=test_acc,
        test_accuracy_ort=ort_acc, predicted_ms=predicted, budget_ms=budget_ms,
        table=str(table.path) if table is not None and table.path else None,
        table_drift=table.drift_factor if table is not None and table.drifted else None,
        engine_path=str(engine_path) if engine_path else None,
        engine_settings=str(settings_path) if settings_path else None)

    if profile is not None:
        timing, artifact, per_round = measure_artifact(profile, module, export.path, shape,
                                                       Path(engine_path) if engine_path else None)
        report.profile, report.measured_artifact = profile.name, artifact
        report.measured_ms = timing.value(profile.statistic)
        report.measured_p10_ms, report.measured_p90_ms = timing.p10_ms, timing.p90_ms
        report.measured_rounds_ms = per_round
        set_metadata(export.path, {"measured_latency_ms": f"{report.measured_ms:.6g}", "profile": profile.name})
        line = f"  latency on {profile.name}: measured {report.measured_ms:.4g} ms ({profile.statistic} of the " \
               f"quietest of {len(per_round)} rounds, p10-p90 {timing.p10_ms:.4g}-{timing.p90_ms:.4g}; rounds " \
               f"{min(per_round):.4g}-{max(per_round):.4g})"
        if predicted is not None:
            line += f", predicted {predicted:.4g} ms"
        if budget_ms is not None:
            line += f", budget {budget_ms:g} ms"
        log(line)
        if report.over_budget:
            report.drift_when_over = _drift_now(table, profile)
            warnings.append(f"measured latency {report.measured_ms:.4g} ms is OVER the budget of {budget_ms:g} ms "
                            f"({report.measured_ms / budget_ms:.3f}x); predicted was "
                            f"{'n/a' if predicted is None else f'{predicted:.4g} ms'}"
                            + _drift_note(report.drift_when_over, table))
    report.warnings = warnings
    for w in warnings:
        log(f"  WARNING: {w}")
    from hwnas.fileio import atomic_write_text

    atomic_write_text(out_dir / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return report

