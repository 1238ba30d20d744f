"""int8 for the CPU: an exported fp32 ONNX subnet statically quantized by ONNX Runtime's own tool.

Most CPU deployments ship int8 as ONNX Runtime's static QDQ quantization: QuantizeLinear /
DequantizeLinear pairs around every quantizable operator, with scales computed offline from
calibration images, which the CPU provider fuses into integer kernels (QLinearConv and friends)
when it builds the session. This module drives `onnxruntime.quantization.quantize_static` with
one set of settings (`Int8Settings`), feeds it the calibration images (`BatchReader`), and refuses
to leave a file that onnx.checker rejects, that ONNX Runtime cannot run, or in which nothing was
quantized, each as one `ExportError` line.

The settings follow ONNX Runtime's own advice for the CPU provider (docs/performance/
model-optimizations/quantization.md): static quantization for CNNs, the QDQ format, S8S8
(int8 activations and weights) as "the first choice", per-channel weights. reduce_range (7-bit
weights) is on: the docs advise it on AVX2 / AVX-512 machines without VNNI, whose u8 x s8 products
saturate, and on the AVX2 development VM (AMD EPYC family 25 model 1, no VNNI) turning it off cost
1.0-1.2 points of validation accuracy on each of three archs with the chosen calibration (0.5-2.8
over all methods); S8S8 and U8S8 with it were equal to 0.05 points. The calibration method
(percentile 99.99, over MinMax, Entropy and percentiles 99.999 / 99.9) and the number of images
(256, over 64 and 1024) were chosen by the least mean int8 drop on validation, on the same archs
(benchmarks/results/int8/calibration.md). On test the choice lost 0.60-0.78 points there.
On a VNNI CPU, reduce_range may cost accuracy rather than save it: measure there before turning it
off. The calibration changes the scales only, never the graph or its speed, so the latency profiler
(`hwnas.latency.backends.OnnxRuntimeCpuBackend`) quantizes each block with these settings on a few
random inputs and MinMax, and times the same kernels the export ships.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from exporters.onnx import METADATA_PREFIX, _first_line, _session, _set_metadata, _temporary_beside, ort_predict
from hwnas.errors import ExportError

METHODS = ("minmax", "entropy", "percentile")
TYPES = ("int8", "uint8")
MIN_OPSET = 10  # quantize_static's own floor ("Models must be opset10 or higher to be quantized")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Int8Settings:
    """How a model is quantized: what changes the graph (format, types, per-channel, reduce_range) and what
    only changes its scales (the calibration method, percentile and images).

    The defaults are the measured choice (module docstring); `graph_settings` is the part a latency
    table depends on.
    """

    method: str = "percentile"
    calibration_images: int = 256
    percentile: float = 99.99  # the percentile method's clipping point (ONNX Runtime's default is 99.999)
    calibration_batch: int = 64
    activation_type: str = "int8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: AVX2 without VNNI saturates u8 x s8 pairs otherwise

    def check(self) -> Int8Settings:
        """Refuse settings that cannot calibrate or that ONNX Runtime would reject, naming the setting."""
        if self.method not in METHODS:
            raise ExportError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in TYPES:
                raise ExportError(f"{name} must be one of {', '.join(TYPES)}, got {getattr(self, name)!r}")
        for name in ("calibration_images", "calibration_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ExportError(f"{name.replace('_', ' ')} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ExportError(f"percentile must be in (50, 100], got {self.percentile!r}")
        return self

    def with_calibration(self, method: str | None = None, images: int | None = None) -> Int8Settings:
        """These settings with another calibration method or image count (None: keep)."""
        return replace(self, method=method or self.method,
                       calibration_images=self.calibration_images if images is None else images).check()

    def graph_settings(self) -> dict[str, Any]:
        """What decides the quantized graph and so its kernels and speed: a latency table's identity."""
        return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                "activations": self.activation_type, "weights": self.weight_type,
                "per_channel": self.per_channel, "reduce_range": self.reduce_range}

    def describe(self, images: int | None = None) -> str:
        """One line for logs: 'static QDQ, S8S8, per-channel, percentile 99.99 on 512 images' (`images`: as fed)."""
        types = "".join("S8" if t == "int8" else "U8" for t in (self.activation_type, self.weight_type))
        method = f"percentile {self.percentile:g}" if self.method == "percentile" else self.method
        count = images or self.calibration_images
        return (f"static QDQ, {types}, {'per-channel' if self.per_channel else 'per-tensor'}"
                f"{', reduce_range' if self.reduce_range else ''}, {method} on {count} images")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_SETTINGS = Int8Settings()


class BatchReader:
    """ONNX Runtime's CalibrationDataReader over numpy batches: at most `limit` images, re-batched to
    `batch` images a call, fed under the model's input name; `drop_last` for a model of fixed batch.

    Duck-typed rather than subclassed (`get_next` is all quantize_static calls), so that importing this
    module does not import onnxruntime.quantization, which takes a second.
    """

    def __init__(self, batches: Iterable[np.ndarray], input_name: str, *, limit: int, batch: int,
                 drop_last: bool = False, expect: tuple[int | None, ...] = ()) -> None:
        self.input_name, self.limit, self.batch, self.drop_last = input_name, limit, batch, drop_last
        self.expect = expect  # one image's shape as the model declares it (None: any size), if known
        self.images = 0  # fed so far
        self.shape: tuple[int, ...] | None = None  # one image's shape, from the first batch
        self._batches = self._rebatched(iter(batches))

    def _checked(self, raw: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(raw, dtype=np.float32)
        if data.ndim < 2:
            raise ExportError(f"calibration batches must be (N, C, H, W) arrays, got shape {data.shape}")
        if self.shape is None:
            self.shape = tuple(data.shape[1:])
            if self.expect and (len(self.expect) != len(self.shape)
                                or any(e is not None and e != d for e, d in zip(self.expect, self.shape, strict=True))):
                shown = ", ".join("?" if e is None else str(e) for e in self.expect)
                raise ExportError(f"calibration images have shape {self.shape}; the model takes ({shown})")
        elif tuple(data.shape[1:]) != self.shape:
            raise ExportError(f"calibration batches differ in shape: {tuple(data.shape[1:])} after {self.shape}")
        return data

    def _rebatched(self, source: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        held: list[np.ndarray] = []
        count = 0
        for raw in source:
            room = self.limit - self.images - count
            if room <= 0:
                break
            held.append(self._checked(raw)[:room])
            count += len(held[-1])
            while count >= self.batch:
                joined = np.concatenate(held)
                rest = joined[self.batch:]
                held, count = ([rest] if len(rest) else []), len(rest)
                self.images += self.batch
                yield joined[:self.batch]
        if count and not self.drop_last:
            self.images += count
            yield np.concatenate(held)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}


@dataclass
class Int8Export:
    """What `quantize_onnx` wrote: the file, how it was calibrated, and how it compares with its fp32 source."""

    path: Path
    source: Path
    settings: Int8Settings
    calibration_images: int
    qdq_nodes: int
    quantized_ops: dict[str, int]  # op type -> nodes whose inputs were quantized
    seconds: float
    agreement: float | None = None  # top-1 agreement with the fp32 model on `check_inputs` (fraction)
    max_abs_diff: float | None = None  # largest |int8 - fp32| logit on `check_inputs`
    metadata: dict[str, str] = field(default_factory=dict)


def quantize_onnx(source: str | Path, path: str | Path, calibration: Iterable[np.ndarray],
                  settings: Int8Settings = DEFAULT_SETTINGS, *, metadata: Mapping[str, str] | None = None,
                  check_inputs: np.ndarray | None = None) -> Int8Export:
    """Quantize the fp32 ONNX file `source` into `path`, calibrated on `calibration` (numpy (N, C, H, W) batches).

    The file appears at `path` only once onnx.checker (full check) passed, at least one operator
    was quantized, and ONNX Runtime ran it to finite outputs; otherwise an `ExportError` says why.
    With `check_inputs` (real images, not the calibration ones), the int8 model's top-1 agreement
    with the fp32 model and their largest logit difference are measured too. The source's metadata
    is kept and the settings are added (`hwnas.precision`, `hwnas.calibration_*`, ...), with
    `metadata` on top.
    """
    settings = settings.check()
    source, path = Path(source), Path(path)
    started = time.perf_counter()
    model = _load(source)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ExportError(f"{source}: opset {opset}; ONNX Runtime quantizes opset {MIN_OPSET} or later "
                          "(export again with --opset 17)")
    quantizable = _quantizable_ops()
    if not any(n.op_type in quantizable for n in model.graph.node):
        found = sorted({n.op_type for n in model.graph.node})
        raise ExportError(f"{source}: ONNX Runtime quantizes none of this graph's operators ({', '.join(found)}); "
                          "there is nothing to make int8")
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    fixed = dims[0] if dims and dims[0] else 0
    reader = BatchReader(calibration, inp.name, limit=settings.calibration_images,
                         batch=fixed or settings.calibration_batch, drop_last=bool(fixed), expect=tuple(dims[1:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(path) as tmp:
        _quantize(source, tmp, reader, settings)
        quantized = _load(tmp)
        counts = {op: sum(n.op_type == op for n in quantized.graph.node) for op in QDQ_OPS}
        if not sum(counts.values()):
            raise ExportError(f"{source}: ONNX Runtime left every operator of this graph in fp32")
        try:
            onnx.checker.check_model(quantized, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"{path}: the quantized model fails onnx.checker: {_first_line(exc)}") from None
        session = _runs(quantized, path, reader.shape or (), fixed or 1)
        agreement = diff = None
        if check_inputs is not None:
            agreement, diff = _compare(_session(str(source), threads=None, providers=None), session, check_inputs)
        props = {key: str(value) for key, value in _settings_metadata(settings, reader.images, source).items()}
        if agreement is not None and diff is not None:
            props.update(int8_agreement=f"{agreement:.6g}", int8_max_abs_diff=f"{diff:.6g}")
        props.update({k: str(v) for k, v in (metadata or {}).items()})
        prefixed = {(k if k.startswith(METADATA_PREFIX) else METADATA_PREFIX + k): v for k, v in props.items()}
        _set_metadata(quantized, prefixed)
        onnx.save(quantized, str(tmp))
        os.replace(tmp, path)
    dequantized = _dequantized(quantized)
    ops: dict[str, int] = {}
    for node in quantized.graph.node:
        if node.op_type not in QDQ_OPS and any(i in dequantized for i in node.input):
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return Int8Export(path=path, source=source, settings=settings, calibration_images=reader.images,
                      qdq_nodes=sum(counts.values()), quantized_ops=ops, seconds=time.perf_counter() - started,
                      agreement=agreement, max_abs_diff=diff, metadata=prefixed)


def is_quantized(path: str | Path) -> bool:
    """Whether an ONNX file holds QDQ nodes: an int8 artifact rather than an fp32 one."""
    return any(n.op_type in QDQ_OPS for n in _load(Path(path)).graph.node)


# ---- helpers ----------------------------------------------------------------------------------------


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: no such ONNX file") from None
    except (OSError, DecodeError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable ONNX file ({_first_line(exc)})") from None


def _quantize(source: Path, target: Path, reader: BatchReader, settings: Int8Settings) -> None:
    """quantize_static with `settings`, its progress prints and pre-processing advice kept off the terminal."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra: dict[str, Any] = {}
    if settings.method == "percentile":
        extra["CalibPercentile"] = settings.percentile
    # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the batches collected before each flush
    # (MinMaxCalibrater.collect_data clears them without merging), and MinMax keeps only per-tensor
    # minima and maxima anyway. The histogram methods keep every activation of every image until the
    # end, which is what bounds the image count (benchmarks/results/int8/calibration.md).
    try:
        with _quiet_quantizer():
            quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ,
                            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                            activation_type=types[settings.activation_type], weight_type=types[settings.weight_type],
                            calibrate_method=methods[settings.method], extra_options=extra)
    except ExportError as exc:  # the reader's: bad calibration batches
        raise ExportError(f"{source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - quantize_static raises anything from ValueError to ORT's own
        if reader.images == 0:
            raise ExportError(f"{source}: no calibration images to quantize it with") from None
        reason = _first_line(exc)
        if "not finite" in reason:
            reason = f"the calibration images give non-finite activation ranges ({reason}); are they finite?"
        raise ExportError(f"{source}: ONNX Runtime could not quantize it: {reason}") from None


def _quantizable_ops() -> set[str]:
    """The operator types quantize_static quantizes by default (its QDQ and QLinear registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """quantize_static prints histogram progress and logs a pre-processing hint to the root logger on every
    call; an export reports what matters itself. Only records from onnxruntime's quantization package are
    dropped, and only for the duration of the call."""
    def from_quantizer(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or "quantization" not in record.pathname

    root = logging.getLogger()
    root.addFilter(from_quantizer)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's all-NaN notes, before the error that says so
            yield
    finally:
        root.removeFilter(from_quantizer)


def _runs(model: onnx.ModelProto, path: Path, shape: tuple[int, ...], batch: int) -> ort.InferenceSession:
    """A CPU session of the quantized model that has run once to finite outputs."""
    try:
        session = _session(model.SerializeToString(), threads=None, providers=None)
        if shape:
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            out = session.run(None, {session.get_inputs()[0].name: x})[0]
            if not np.all(np.isfinite(out)):
                raise ExportError(f"{path}: the quantized model computes non-finite outputs (were the calibration "
                                  "images finite?)")
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors carry no common base
        raise ExportError(f"{path}: ONNX Runtime cannot run the quantized model: {_first_line(exc)}") from None
    return session


def _compare(fp32: ort.InferenceSession, int8: ort.InferenceSession, inputs: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and the largest absolute logit difference of the two models on `inputs`."""
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    a, b = ort_predict(fp32, x, len(x)), ort_predict(int8, x, len(x))
    agreement = float(np.mean(a.reshape(len(x), -1).argmax(1) == b.reshape(len(x), -1).argmax(1)))
    return agreement, float(np.max(np.abs(a.astype(np.float64) - b)))


def _dequantized(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}


def _settings_metadata(settings: Int8Settings, images: int, source: Path) -> dict[str, Any]:
    """The settings as ONNX metadata (without the prefix): enough to redo the quantization."""
    meta: dict[str, Any] = {
        "precision": "int8", "quantized_from": source.name,
        "quantization": f"onnxruntime {ort.__version__} quantize_static, QDQ",
        "activation_type": settings.activation_type, "weight_type": settings.weight_type,
        "per_channel": str(settings.per_channel).lower(), "reduce_range": str(settings.reduce_range).lower(),
        "calibration_method": settings.method, "calibration_images": images,
        "calibration_batch": settings.calibration_batch,
    }
    if settings.method == "percentile":
        meta["calibration_percentile"] = f"{settings.percentile:g}"
    return meta


def calibration_batches_needed(settings: Int8Settings) -> int:
    """How many batches of `settings.calibration_batch` images hold `settings.calibration_images`."""
    return math.ceil(settings.calibration_images / settings.calibration_batch)


__all__ = ["DEFAULT_SETTINGS", "METHODS", "BatchReader", "Int8Export", "Int8Settings", "calibration_batches_needed",
           "is_quantized", "quantize_onnx"]
