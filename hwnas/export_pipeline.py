"""`run_export`: everything `hwnas export` does, as one library call: the archs a search chose, cut out of the
supernet they were searched on, exported, verified and timed (`hwnas.deploy.deploy` for each).

What to export is a run record (`hwnas.runrecord`): one arch inline or in a JSON file, a search's
best.json, or a search folder (every member of a family.json). The record says how the search
scored its arch (data split, BN settings), which table predicted it and the drift it was scaled
by, and which weights it was found with (a fine-tuning search's own); the export repeats all of it,
so the accuracy and latency it reports are comparable with the search's.

Files a record names (the supernet, fine-tuned weights, the table) are found relative to the record's own
folder (how a search records them, `hwnas.fileio.recorded_path`), or as given (relative to the working
directory, as older records hold them), so `hwnas export --arch RESULTS` runs without --supernet from any
directory, after the results were moved with their weights too; a recorded checkpoint that is in neither place
is one line naming the record and both places.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwnas.data.readers import check_val_size, first_val_size
from hwnas.errors import ArchError, CheckpointError, HwnasError
from hwnas.fileio import check_output_dir, display_path, resolve_recorded
from hwnas.runrecord import BEST_NAME, FAMILY_NAME, RunRecord, read_family
from hwnas.space import Arch

if TYPE_CHECKING:
    from exporters.onnx_int8 import Int8Settings
    from hwnas.data import Dataset
    from hwnas.deploy import DeployReport
    from hwnas.latency.profiles import DeviceProfile
    from hwnas.latency.table import LatencyTable
    from hwnas.space import SearchSpace

Log = Callable[[str], None]
FORMATS = ("onnx", "tensorrt")
# Per format: the precisions it ships, the first the default. ONNX: the fp32 file, or int8 (static QDQ
# quantization of it, exporters.onnx_int8). TensorRT: the engine's precision (the ONNX beside it is fp32).
PRECISIONS: dict[str, tuple[str, ...]] = {"onnx": ("fp32", "int8"), "tensorrt": ("fp16", "fp32", "int8")}


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class ExportRequest:
    """What to export (`arch`: inline arch JSON, a JSON file such as best.json, or a search folder) and how.

    Without `supernet`, the arch is cut from the checkpoint its search used (the record's
    `supernet`, or the fine-tuned weights of a fine-tuning search); with `space` and no record,
    from a freshly initialised supernet of that space (a pipeline check). `data` None means the
    dataset the checkpoint was trained on, "none" no data (no BN re-estimation, no accuracy).
    `profile` times the exported artifact; `table` and `budget_ms` default to the search's.
    `precision` None is the format's default (ONNX fp32, TensorRT fp16); ONNX int8 is calibrated
    with `calibration` (a method) on `calibration_images` training images, by default the measured
    choice of `exporters.onnx_int8`. `val_size` is the validation split carved from the training
    images (a count, or a fraction below 1; None: the record's, else the checkpoint's, else 5000),
    as training and search carved it: the rest is what BN is re-estimated on.
    """

    arch: str
    supernet: Path | None = None
    space: str | None = None
    format: str = "onnx"
    precision: str | None = None
    calibration: str | None = None
    calibration_images: int | None = None
    opset: int = 17
    simplify: bool = True
    profile: str | Path | None = None
    table: Path | None = None
    budget_ms: float | None = None
    data: str | None = None
    test_batches: int | None = None
    val_size: int | float | None = None
    allow_mismatch: bool = False
    out: Path = Path("exports")

    def check(self) -> ExportRequest:
        if self.format not in FORMATS:
            raise HwnasError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        allowed = PRECISIONS[self.format]
        if self.precision is None:
            self.precision = allowed[0]
        if self.precision not in allowed:
            other = [f for f in FORMATS if self.precision in PRECISIONS[f]]
            hint = f" ({self.precision} is for --format {other[0]})" if other else ""
            raise HwnasError(f"--format {self.format} ships --precision {', '.join(allowed)}, not "
                             f"{self.precision!r}{hint}")
        if (self.calibration is not None or self.calibration_images is not None) and not self.onnx_int8:
            raise HwnasError("--calibration and --calibration-images calibrate an int8 ONNX file: "
                             "give --precision int8 with --format onnx (TensorRT calibrates its own)")
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise HwnasError(f"--budget-ms must be a positive number of milliseconds, got {self.budget_ms}")
        if self.test_batches is not None and self.test_batches < 1:
            raise HwnasError(f"--test-batches must be >= 1 (leave it out for the whole test split), got "
                             f"{self.test_batches}")
        check_val_size(self.val_size)
        self.int8_settings()  # a bad method or count is refused before any work
        if self.onnx_int8 and self.data == "none":
            raise HwnasError("an int8 ONNX file is calibrated on training images: give the dataset (--data), "
                             "not 'none'")
        return self

    @property
    def onnx_int8(self) -> bool:
        return self.format == "onnx" and self.precision == "int8"

    def int8_settings(self) -> Int8Settings | None:
        """The quantization settings of an int8 ONNX export (None for any other)."""
        if not self.onnx_int8:
            return None
        from exporters.onnx_int8 import DEFAULT_SETTINGS

        return DEFAULT_SETTINGS.with_calibration(self.calibration, self.calibration_images)


@dataclass
class ExportJob:
    """One arch to export, with the record of the search that chose it and the folder it goes to."""

    record: RunRecord
    name: str | None  # a family member's folder name; None for a single export
    where: Path | None = None  # the record's file (best.json); None for an inline arch


def export_jobs(arch_arg: str) -> list[ExportJob]:
    """What to export: one arch (inline or a file) or every arch a search folder names (family.json)."""
    path = Path(arch_arg)
    if not arch_arg.lstrip().startswith("{") and path.is_dir():
        if (path / FAMILY_NAME).is_file():
            return [ExportJob(_read_record(path / entry.dir / BEST_NAME), entry.dir, path / entry.dir / BEST_NAME)
                    for entry in read_family(path) if entry.best_arch_id]
        if (path / BEST_NAME).is_file():
            return [ExportJob(_read_record(path / BEST_NAME), None, path / BEST_NAME)]
        raise ArchError(f"{path}: a search folder holds best.json or family.json; neither is there")
    arch = Arch.parse(arch_arg)
    from_file = path.suffix == ".json" and path.is_file()
    record = _read_record(path) if from_file else RunRecord(arch=None)
    record.arch = json.loads(arch.to_json())
    return [ExportJob(record, None, path if from_file else None)]


def _read_record(path: Path) -> RunRecord:
    record = RunRecord.read(path)
    if record.arch is None:
        raise ArchError(f"{path}: the search found no arch within its budget (\"arch\": null)")
    return record


def run_export(request: ExportRequest, *, log: Log = print, warn: Log = _stderr_warning) -> list[DeployReport]:
    """Export every arch `request.arch` names into `request.out` (one folder per family member); their reports."""
    from hwnas.deploy import check_profile_precision, deploy

    request.check()
    check_output_dir(request.out)
    jobs = export_jobs(request.arch)
    if not jobs:
        raise HwnasError(f"{request.arch}: no arch to export (every search in the folder came back empty)")
    profile = None
    if request.profile is not None:  # a profile for the other precision is refused before any loading
        from hwnas.latency.profiles import load_profile

        profile = load_profile(request.profile)
        check_profile_precision(profile, "int8" if request.onnx_int8 else "fp32")
    paths = [_supernet_path(request, job, warn) for job in jobs]  # a recorded file that is gone: before any loading
    loaded: dict[Path | None, tuple[Any, str, dict[str, Any]]] = {}
    first = Arch.from_dict(jobs[0].record.arch or {})
    loaded[paths[0]] = _supernet(paths[0], request.space, first.space)
    supernet, source, state = loaded[paths[0]]
    space = supernet.space
    dataset = _dataset(request.data, state, jobs[0].record, space, request.val_size)
    if request.onnx_int8 and dataset is None:
        raise HwnasError("an int8 ONNX file is calibrated on training images: give the dataset (--data), not 'none'")
    reports = []
    for job, path in zip(jobs, paths, strict=True):
        record = job.record
        arch = Arch.from_dict(record.arch or {})
        if path not in loaded:  # a family member fine-tuned its own weights
            loaded[path] = _supernet(path, request.space, arch.space)
        supernet, source, _ = loaded[path]
        space = supernet.space
        space.validate(arch)
        recorded_table = None if request.table else _recorded_file(job, "table", record.table, required=False)
        table = _table(request.table or recorded_table, space, profile, request.allow_mismatch, warn)
        table = _with_search_drift(table, record, explicit=request.table is not None, log=log)
        budget = request.budget_ms if request.budget_ms is not None else record.budget_ms
        out = request.out / job.name if job.name else request.out
        log(f"exporting {arch.arch_id} from {source}" + (f" ({job.name})" if job.name else ""))
        reports.append(deploy(
            supernet, arch, out, dataset=dataset, settings=record.eval_settings, profile=profile, table=table,
            budget_ms=float(budget) if budget is not None else None, search_accuracy=record.accuracy,
            tensorrt=request.precision if request.format == "tensorrt" else None, opset=request.opset,
            simplify=request.simplify, test_batches=request.test_batches, metadata={"source": source}, log=log,
            precision="int8" if request.onnx_int8 else "fp32", int8=request.int8_settings()))
    return reports


def _supernet_path(request: ExportRequest, job: ExportJob, warn: Log) -> Path | None:
    """The checkpoint to cut `job`'s arch from: --supernet, else the fine-tuned weights or the supernet its record
    names (None: a fresh supernet of --space)."""
    tuned = job.record.finetuned_supernet
    if request.supernet is not None:
        if tuned:
            found = _recorded_file(job, "finetuned_supernet", tuned, required=False) or Path(tuned)
            if found.resolve() != request.supernet.resolve():
                warn(f"{display_path(job.where) if job.where else request.arch} was found with fine-tuned weights "
                     f"({tuned}); exporting it with {request.supernet} instead")
        return request.supernet
    if tuned:  # the search changed the shared weights: the arch was chosen with these
        return _recorded_file(job, "finetuned_supernet", tuned)
    if job.record.supernet and request.space is None:  # the checkpoint the search scored its archs on
        return _recorded_file(job, "supernet", job.record.supernet)
    return None


def _recorded_file(job: ExportJob, field: str, value: str | None, *, required: bool = True) -> Path | None:
    """A file the record names: relative to the record's folder (as a search records it), or as given
    (relative to the working directory, as older records hold it) where only that exists.

    Not found: one CheckpointError naming the record, the field and both places looked in, or None when not
    `required` (the caller reports the file as given).
    """
    if not value:
        return None
    given = Path(value)
    folder = job.where.parent if job.where is not None else None
    found = resolve_recorded(given, folder) if folder is not None else given
    if found.is_file():
        return found
    if not required:
        return None
    places = [given] if given.is_absolute() or folder is None else [folder / given, given]
    record = display_path(job.where) if job.where is not None else "the run record"
    looked = " or ".join(dict.fromkeys(display_path(p) for p in places))
    raise CheckpointError(f"{record} records {field} '{value}', which is not there (no file at {looked}): give "
                          "--supernet CKPT")


def _supernet(path: Path | None, space_name: str | None, arch_space: str) -> tuple[Any, str, dict[str, Any]]:
    """The supernet to cut from (loaded, or fresh for a pipeline check), what to call it, and its checkpoint."""
    if path is not None:
        from hwnas.checkpoint import load_supernet

        supernet, state = load_supernet(path, space_name=arch_space)
        return supernet.eval(), str(path), state
    if space_name is None:
        raise HwnasError("give --supernet CKPT, or --space NAME to export from a freshly initialised supernet")
    from hwnas import spaces
    from hwnas.supernet import Supernet

    return Supernet(spaces.get(space_name)).eval(), "fresh supernet (random weights)", {}


def _dataset(spec: str | None, state: dict[str, Any], record: RunRecord, space: SearchSpace,
             val_size: int | float | None = None) -> Dataset | None:
    """The data to re-estimate BN and measure accuracy on: the checkpoint's unless given; None for 'none'.

    The validation split is carved as the search (or the training) carved it: `val_size` (--val-size), else
    the record's, else the checkpoint's, else hwnas train's default of 5000; so the training images BN is
    re-estimated on are the ones the search used.
    """
    data_spec = spec or (str(state["dataset"]).split(" (", 1)[0] if state.get("dataset") else None)
    if not data_spec or data_spec == "none":
        return None
    from hwnas.data import load_dataset

    dataset = load_dataset(data_spec, val_size=first_val_size(val_size, record.val_size, state.get("val_size")), seed=0)
    if (dataset.in_channels, dataset.num_classes) != (space.in_channels, space.num_classes):
        raise HwnasError(f"dataset '{data_spec}' has {dataset.in_channels} channels and {dataset.num_classes} "
                         f"classes; the supernet expects {space.in_channels} and {space.num_classes}")
    return dataset


def _table(path: str | Path | None, space: SearchSpace, profile: DeviceProfile | None, allow_mismatch: bool,
           warn: Log) -> LatencyTable | None:
    """The latency table for the prediction, or None. A table of another space (or shape) is refused: it cannot
    price the arch. One of another device or profile is shown as a warning: the export is timed here anyway."""
    if not path:
        return None
    from hwnas.latency.table import LatencyTable

    table = LatencyTable.load(Path(path))
    table.check_target(space, allow_mismatch=allow_mismatch)
    fp = None
    if profile is not None:
        from hwnas.latency.device import fingerprint

        fp = fingerprint(profile)
    notes = table.check_target(space, profile, fp, allow_mismatch=True)
    if notes and not allow_mismatch:
        warn(f"{table.path}: the prediction is for another target than this one: {'; '.join(notes)}")
    return table


def _with_search_drift(table: LatencyTable | None, record: RunRecord, *, explicit: bool, log: Log
                       ) -> LatencyTable | None:
    """The table as the search saw it: scaled by the drift it measured (`hwnas search --drift correct`)."""
    factor = record.drift_factor
    if table is None or explicit or factor is None:
        return table
    log(f"  prediction scaled by {factor:.3f}, the drift the search measured on this device "
        "(hwnas search --drift correct)")
    return table.with_drift(factor, record.latency_drift)


__all__ = ["ExportJob", "ExportRequest", "export_jobs", "run_export"]
