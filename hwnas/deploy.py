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
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwnas.errors import HwnasError
from hwnas.evaluation import DEFAULT_SETTINGS, EvalSettings, accuracy, recalibrated_subnet
from hwnas.space import Arch

if TYPE_CHECKING:
    from hwnas.data import Dataset, Split
    from hwnas.latency.profiles import DeviceProfile
    from hwnas.latency.quiet import QuietGuard
    from hwnas.latency.table import LatencyTable
    from hwnas.supernet import Supernet

REPORT_NAME = "deploy.json"


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
    measured_others_busy: float | None = None  # the other CPUs' busy share while it was timed (hwnas.latency.quiet)
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
           settings: EvalSettings = DEFAULT_SETTINGS, profile: DeviceProfile | None = None,
           table: LatencyTable | None = None, budget_ms: float | None = None, search_accuracy: float | None = None,
           tensorrt: str | None = None, opset: int = 17, test_batches: int | None = None,
           metadata: Mapping[str, str] | None = None, simplify: bool = True, log: Any = print,
           guard: QuietGuard | None = None) -> DeployReport:
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

    val_acc: float | None
    test_acc: float | None
    if dataset is not None:
        module = recalibrated_subnet(supernet, arch, dataset.train, settings)
        val_acc = accuracy(module, dataset.val, arch.resolution, batch_size=settings.batch_size,
                           max_batches=settings.val_batches)
        test_acc = accuracy(module, dataset.test, arch.resolution, batch_size=settings.batch_size,
                            max_batches=test_batches)
        log(f"  accuracy (torch, BN re-estimated on {settings.bn_batches}x{settings.bn_batch_size} training images): "
            f"validation {val_acc:.2f} %, test {test_acc:.2f} %")
        if search_accuracy is not None and abs(val_acc - search_accuracy) > 0.1:
            warnings.append(f"validation accuracy {val_acc:.2f} % differs from the search's {search_accuracy:.2f} % "
                            "by more than 0.1 point (another dataset split or BN setting than the search's?)")
    else:
        module = supernet.extract(arch).eval()
        val_acc = test_acc = None  # no data: a pipeline check

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
        from hwnas.latency.artifact import measure_artifact

        if guard is None and not profile.is_cuda:
            from hwnas.latency.quiet import QuietGuard

            guard = QuietGuard(policy="warn", max_wait_s=20.0, log=log)
        timing, artifact, per_round = measure_artifact(profile, module, export.path, shape,
                                                       Path(engine_path) if engine_path else None, guard=guard)
        if guard is not None:
            warnings.extend(guard.warnings)
            report.measured_others_busy = None if math.isnan(timing.others_busy) else round(timing.others_busy, 4)
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
        if report.over_budget and budget_ms is not None:
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


def summary_table(reports: list[DeployReport]) -> str:
    """One line per exported arch: budget, predicted, measured, accuracy, file."""
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    head = f"{'arch':<12} {'budget ms':>9} {'predicted':>9} {'measured':>9} {'meas/budget':>11} " \
           f"{'test acc torch':>14} {'test acc ORT':>12}  file"
    lines = [head, "-" * len(head)]
    for r in reports:
        ratio = r.measured_ms / r.budget_ms if r.measured_ms is not None and r.budget_ms else None
        lines.append(f"{r.arch_id:<12} {fmt(r.budget_ms, '9.4g')} {fmt(r.predicted_ms, '9.4g')} "
                     f"{fmt(r.measured_ms, '9.4g')} {fmt(ratio, '11.3f')} {fmt(r.test_accuracy_torch, '13.2f')}% "
                     f"{fmt(r.test_accuracy_ort, '11.2f')}%  {r.onnx_path}")
    return "\n".join(lines)
