"""Cut a searched arch out of a supernet and ship it: BN re-estimation, accuracy, export, measured latency.

The promise of a weight-sharing search is that the subnet it picked is deployable as it is. That
only holds when the exported model sees the same BN statistics the search scored it with, so the
subnet is re-estimated here exactly as `SupernetEvaluator` does (same training batches, same
seed) and its validation accuracy is recomputed: a mismatch with the search's figure shows at
once. The exported file is then timed the way the profiler times (the profile's runtime, threads,
warm-up and repeats) and set beside the table's prediction and the budget, because a table is a
model of the device and only a measurement of the artifact says whether it meets the budget.

An int8 export (`precision="int8"`) ships the fp32 file statically quantized by ONNX Runtime
(`exporters.onnx_int8`), calibrated on training images of the re-estimated model, and reports
both sides of the trade: test accuracy in ONNX Runtime and latency on the same profile for the
fp32 file and the int8 one.

Both files and deploy.json carry the preprocessing the accuracy was measured with and the class
names (`hwnas.data.preprocessing`), so the model can be run right without hwnas; and they name
files relative to the export folder, never by this machine's absolute layout, which means nothing
where the model ships to.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwnas.data.preprocessing import preprocessing_for
from hwnas.errors import HwnasError
from hwnas.evaluation import DEFAULT_SETTINGS, EvalSettings, accuracy, recalibrated_subnet
from hwnas.fileio import atomic_write_text, recorded_path
from hwnas.space import Arch

if TYPE_CHECKING:
    import numpy as np

    from exporters.onnx_int8 import Int8Export, Int8Settings
    from hwnas.data import Dataset, Split
    from hwnas.latency.profiles import DeviceProfile
    from hwnas.latency.quiet import QuietGuard
    from hwnas.latency.table import LatencyTable
    from hwnas.supernet import Supernet

REPORT_NAME = "deploy.json"
PRECISIONS = ("fp32", "int8")  # of the ONNX file that ships; TensorRT engines have their own (`tensorrt`)
INT8_CHECK_IMAGES = 256  # validation images the int8 model's top-1 agreement with fp32 is measured on


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
    precision: str = "fp32"  # the ONNX file that ships: `onnx_path` (fp32), or `int8_onnx_path` quantized from it
    int8_onnx_path: str | None = None
    quantization: dict[str, Any] | None = None  # the int8 settings and calibration images (also in its metadata)
    int8_agreement: float | None = None  # top-1 agreement of int8 with fp32 on validation images (fraction)
    test_accuracy_int8: float | None = None  # ONNX Runtime, the int8 file, the same test images
    fp32_measured_ms: float | None = None  # int8 exports: the fp32 file timed on the same profile
    fp32_measured_rounds_ms: list[float] = field(default_factory=list)
    val_size: int | None = None  # training images held out as validation (as training and search); None: a folder
    preprocessing: dict[str, Any] | None = None  # `hwnas.data.preprocessing.Preprocessing`, also in the ONNX files
    warnings: list[str] = field(default_factory=list)

    @property
    def shipped_path(self) -> str:
        """The ONNX file to deploy: the int8 one for an int8 export."""
        return self.int8_onnx_path or self.onnx_path

    @property
    def speedup(self) -> float | None:
        """int8 exports: fp32's measured latency over int8's (> 1: int8 is quicker)."""
        if self.fp32_measured_ms is None or not self.measured_ms:
            return None
        return self.fp32_measured_ms / self.measured_ms

    @property
    def over_budget(self) -> bool:
        return self.budget_ms is not None and self.measured_ms is not None and self.measured_ms > self.budget_ms

    def to_dict(self, folder: str | Path | None = None) -> dict[str, Any]:
        """The report as JSON data; with `folder` (deploy.json's), every file named relative to it
        (`hwnas.fileio.recorded_path`: the files it sits beside by their names), never by an absolute path."""
        data = asdict(self)
        if folder is not None:
            files = {data[key] for key in _PATH_FIELDS}  # measured_artifact may be "torch module (...)" instead
            for key in (*_PATH_FIELDS, "measured_artifact"):
                if data[key] is not None and data[key] in files:
                    data[key] = recorded_path(data[key], folder)
            if data["dataset"]:
                data["dataset"] = portable_spec(data["dataset"], folder)
        return data


_PATH_FIELDS = ("onnx_path", "int8_onnx_path", "engine_path", "engine_settings", "table")
_PATH_METADATA = ("source", "search")  # the `metadata` keys that name a file or folder (a checkpoint, a search)


def portable_spec(spec: str, folder: str | Path) -> str:
    """A dataset spec as a file in `folder` records it: its directory (`imagefolder:DIR?size=N`) relative to
    `folder` (`hwnas.fileio.recorded_path`), never this machine's absolute path."""
    name, colon, arg = spec.partition(":")
    where, mark, query = arg.partition("?")
    if not colon or not where:
        return spec
    return f"{name}:{recorded_path(where, folder)}{mark}{query}"


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


def int8_calibration(train: Split, resolution: int, settings: Int8Settings, *, seed: int = 0
                     ) -> Iterator[np.ndarray]:
    """The training images an int8 export is calibrated on: seeded and not augmented, as BN is re-estimated
    (with the same seed, the same images come first), at the arch's resolution."""
    from exporters.onnx_int8 import calibration_batches_needed

    return (x.numpy() for x, _ in train.batches(settings.calibration_batch, resolution=resolution, shuffle=True,
                                                 seed=seed, max_batches=calibration_batches_needed(settings)))


def check_profile_precision(profile: DeviceProfile | None, precision: str) -> None:
    """An ONNX Runtime profile times the file that ships, so its precision must be the export's; refused up front."""
    if profile is None or profile.backend != "onnxruntime-cpu" or profile.precision == precision:
        return
    hint = "cpu-onnxruntime-int8" if precision == "int8" else "cpu-onnxruntime"
    raise HwnasError(f"profile '{profile.name}' times {profile.precision} ONNX models, this export ships "
                     f"{precision}: give --profile {hint} (or another {precision} profile)")


def _preprocessing_metadata(pre: dict[str, Any]) -> dict[str, str]:
    """The ONNX metadata of a preprocessing record: `hwnas.preprocessing` (deploy.json's record, as JSON) and
    `hwnas.classes` (the class names in the order of the outputs, a JSON list)."""
    return {"preprocessing": json.dumps(pre), "classes": json.dumps(pre["classes"])}


def _quantize(export_path: Path, out: Path, arch: Arch, dataset: Dataset, settings: EvalSettings,
              int8: Int8Settings | None, log: Any, pre: dict[str, Any] | None) -> Int8Export:
    """The fp32 file quantized, calibrated on training images, checked against fp32 on validation images; it
    carries the fp32 file's preprocessing record (the same input)."""
    from exporters.onnx_int8 import DEFAULT_SETTINGS as INT8_DEFAULTS
    from exporters.onnx_int8 import quantize_onnx

    chosen = (int8 or INT8_DEFAULTS).check()
    check = next(iter(dataset.val.batches(INT8_CHECK_IMAGES, resolution=arch.resolution)))[0].numpy()
    images = int8_calibration(dataset.train, arch.resolution, chosen, seed=settings.seed)
    result = quantize_onnx(export_path, out, images, chosen, check_inputs=check,
                           metadata={"calibration_split": "train", "calibration_seed": str(settings.seed),
                                     "calibration_dataset": portable_spec(dataset.spec or dataset.name,
                                                                          out.parent),
                                     **(_preprocessing_metadata(pre) if pre is not None else {})})
    log(f"  int8: {result.path} ({chosen.describe(result.calibration_images)} of the training split; "
        f"onnx.checker passed; {result.qdq_nodes} Q/DQ nodes; "
        f"top-1 agreement with fp32 {100 * (result.agreement or 0):.1f} % on {len(check)} validation images)")
    return result


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
           guard: QuietGuard | None = None, precision: str = "fp32", int8: Int8Settings | None = None
           ) -> DeployReport:
    """Export `arch` from `supernet` to OUT_DIR and verify it; returns its `DeployReport` (and OUT_DIR/deploy.json).

    With `dataset`, BN is re-estimated as the search did and the accuracy is measured on the
    validation split (to compare with `search_accuracy`) and on the test split in torch and in
    ONNX Runtime; without it the subnet keeps the supernet's BN statistics (a pipeline check).
    `profile` times the exported artifact; `table` predicts its latency; `tensorrt` ("fp16" or
    "int8") also builds an engine, int8 calibrated on training images. `precision="int8"` also
    writes the ONNX file statically quantized with `int8` (default: `exporters.onnx_int8`'s measured
    choice), calibrated on training images; it is what `profile` (an int8 ONNX Runtime profile) times,
    beside the fp32 file on the same profile.
    """
    from exporters.onnx import INPUT_NAME, export_onnx, set_metadata

    if precision not in PRECISIONS:
        raise HwnasError(f"ONNX precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and dataset is None:
        raise HwnasError("an int8 ONNX file is calibrated on training images: give the dataset (--data), not 'none'")
    check_profile_precision(profile, precision)
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

    pre = preprocessing_for(dataset, arch.resolution, input_name=INPUT_NAME) if dataset is not None else None
    if dataset is not None and pre is None:
        warnings.append(f"no preprocessing recorded: hwnas does not know what a {type(dataset.test).__name__} does "
                        "to an image (the ONNX file and deploy.json carry none)")
    predicted = table.predict(arch) if table is not None else None
    props = {"source": str(metadata.get("source", "")) if metadata else ""}
    props.update({k: str(v) for k, v in (metadata or {}).items()})
    for key in _PATH_METADATA:  # the checkpoint and the search, named from the export folder as deploy.json names files
        if props.get(key) and Path(props[key]).exists():
            props[key] = recorded_path(props[key], out_dir)
    for key, value in (("predicted_latency_ms", predicted), ("budget_ms", budget_ms), ("val_accuracy", val_acc),
                       ("test_accuracy_torch", test_acc), ("search_accuracy", search_accuracy)):
        if value is not None:
            props[key] = f"{value:.6g}"
    if table is not None:
        props.update(table_device=table.device_slug, table_profile=str((table.profile_dict or {}).get("name")))
    if dataset is not None:
        props.update(dataset=portable_spec(dataset.spec or dataset.name, out_dir),
                     bn_batches=str(settings.bn_batches), bn_batch_size=str(settings.bn_batch_size),
                     bn_seed=str(settings.seed))
        if dataset.val_carved:
            props["val_size"] = str(len(dataset.val))
    if pre is not None:
        props.update(_preprocessing_metadata(pre.to_dict()))
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

    int8_export = None
    int8_acc = None
    if precision == "int8" and dataset is not None:
        int8_export = _quantize(export.path, out_dir / f"{space.name}_{arch.arch_id}.int8.onnx", arch, dataset,
                                settings, int8, log, pre.to_dict() if pre is not None else None)
        int8_acc = ort_accuracy(int8_export.path, dataset.test, arch.resolution, batch_size=settings.batch_size,
                                max_batches=test_batches)
        set_metadata(int8_export.path, {"test_accuracy_ort": f"{int8_acc:.6g}",
                                        "test_accuracy_ort_fp32": f"{ort_acc:.6g}"})
        log(f"  accuracy (ONNX Runtime, test): int8 {int8_acc:.2f} %, fp32 {ort_acc:.2f} % "
            f"({int8_acc - (ort_acc or 0):+.2f} points)")

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
        engine_settings=str(settings_path) if settings_path else None, precision=precision,
        val_size=len(dataset.val) if dataset is not None and dataset.val_carved else None,
        preprocessing=pre.to_dict() if pre else None)
    if int8_export is not None:
        report.int8_onnx_path, report.int8_agreement = str(int8_export.path), int8_export.agreement
        report.test_accuracy_int8 = int8_acc
        report.quantization = {**int8_export.settings.to_dict(), "calibration_images": int8_export.calibration_images,
                               "calibration_split": "train", "calibration_seed": settings.seed,
                               "graph": int8_export.settings.graph_settings(), "qdq_nodes": int8_export.qdq_nodes}

    if profile is not None:
        from hwnas.latency.artifact import measure_artifact

        if guard is None and not profile.is_cuda:
            from hwnas.latency.quiet import QuietGuard

            guard = QuietGuard(policy="warn", max_wait_s=20.0, log=log)
        shipped = int8_export.path if int8_export is not None else export.path
        timing, artifact, per_round = measure_artifact(profile, module, shipped, shape,
                                                       Path(engine_path) if engine_path else None, guard=guard)
        if guard is not None:
            warnings.extend(guard.warnings)
            report.measured_others_busy = None if math.isnan(timing.others_busy) else round(timing.others_busy, 4)
        report.profile, report.measured_artifact = profile.name, artifact
        report.measured_ms = timing.value(profile.statistic)
        report.measured_p10_ms, report.measured_p90_ms = timing.p10_ms, timing.p90_ms
        report.measured_rounds_ms = per_round
        set_metadata(shipped, {"measured_latency_ms": f"{report.measured_ms:.6g}", "profile": profile.name})
        line = f"  latency on {profile.name}: measured {report.measured_ms:.4g} ms ({profile.statistic} of the " \
               f"quietest of {len(per_round)} rounds, p10-p90 {timing.p10_ms:.4g}-{timing.p90_ms:.4g}; rounds " \
               f"{min(per_round):.4g}-{max(per_round):.4g})"
        if int8_export is not None:
            # The fp32 file on the same profile's settings: the other side of the trade (timed after, not
            # interleaved; benchmarks/int8.py interleaves them).
            fp32_timing, _, fp32_rounds = measure_artifact(profile, module, export.path, shape, guard=guard)
            report.fp32_measured_ms = fp32_timing.value(profile.statistic)
            report.fp32_measured_rounds_ms = fp32_rounds
            set_metadata(shipped, {"fp32_measured_latency_ms": f"{report.fp32_measured_ms:.6g}"})
            line += f"; the fp32 file {report.fp32_measured_ms:.4g} ms ({report.speedup:.2f}x int8's)"
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
    atomic_write_text(out_dir / REPORT_NAME, json.dumps(report.to_dict(out_dir), indent=2) + "\n")
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return report


def summary_table(reports: list[DeployReport]) -> str:
    """One line per exported arch: budget, predicted, measured, accuracy, file.

    With an int8 export among them, the trade-off too: the fp32 file's latency on the same profile,
    the speed-up, and the int8 file's test accuracy beside fp32's ("test acc ORT"); "measured" and
    "file" are then those of the file that ships.
    """
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    int8 = any(r.precision == "int8" for r in reports)
    head = f"{'arch':<12} {'budget ms':>9} {'predicted':>9} {'measured':>9} " \
           + (f"{'fp32 ms':>9} {'speed-up':>8} " if int8 else "") \
           + f"{'meas/budget':>11} {'test acc torch':>14} {'test acc ORT':>12}" \
           + (f" {'test acc int8':>13}" if int8 else "") + "  file"
    lines = [head, "-" * len(head)]
    for r in reports:
        ratio = r.measured_ms / r.budget_ms if r.measured_ms is not None and r.budget_ms else None
        trade = f"{fmt(r.fp32_measured_ms, '9.4g')} {fmt(r.speedup, '7.2f')}{'x' if r.speedup else ' '} " \
            if int8 else ""
        acc8 = f" {fmt(r.test_accuracy_int8, '12.2f')}%" if int8 else ""
        lines.append(f"{r.arch_id:<12} {fmt(r.budget_ms, '9.4g')} {fmt(r.predicted_ms, '9.4g')} "
                     f"{fmt(r.measured_ms, '9.4g')} {trade}{fmt(ratio, '11.3f')} "
                     f"{fmt(r.test_accuracy_torch, '13.2f')}% {fmt(r.test_accuracy_ort, '11.2f')}%{acc8}  "
                     f"{r.shipped_path}")
    return "\n".join(lines)
