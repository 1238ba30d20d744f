"""TensorRT engines from hwnas ONNX exports: build (fp32 / fp16 / int8 with calibration) and run or time.

Written against TensorRT 10's Python API (`execute_async_v3`, named I/O tensors, memory pools) and
type-checked with `tensorrt-stubs`. TensorRT is optional: where it or a CUDA GPU is missing, every
entry point raises `ExportError` with one line saying so, and nothing pretends an engine was built.

int8 here is TensorRT's implicit quantisation with an entropy calibrator (`exporters.tensorrt_calibration`).
NVIDIA deprecated the calibrator API in TensorRT 10.1 in favour of explicit quantisation (Q/DQ nodes
in the ONNX, e.g. from TensorRT Model Optimizer); TensorRT 10.x still runs it, and it needs no extra
package.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.tensorrt_calibration import CalibrationFeed, make_calibrator
from hwnas.errors import ExportError
from hwnas.fileio import atomic_write_bytes, file_sha256

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

PRECISIONS = ("fp32", "fp16", "int8")
INSTALL_HINT = "pip install 'hwnas[tensorrt]' on a machine with NVIDIA's registry and a CUDA GPU"


def tensorrt_available() -> bool:
    """Whether the real TensorRT bindings import here (type stubs alone make `import tensorrt` succeed
    as an empty namespace package, so importability is not enough)."""
    return _import_problem() is None


def require_tensorrt() -> ModuleType:
    """The `tensorrt` module, or an ExportError whose one line tells the user what to install."""
    problem = _import_problem()
    if problem is not None:
        raise ExportError(f"TensorRT is not installed ({INSTALL_HINT}); {problem}")
    import tensorrt

    major = int(tensorrt.__version__.split(".")[0])
    if major < 10:
        raise ExportError(f"TensorRT {tensorrt.__version__} is too old: hwnas uses the TensorRT 10 API "
                          f"({INSTALL_HINT})")
    return tensorrt


@dataclass
class EngineBuild:
    """Where the engine and its build settings went, and what built it."""

    engine_path: Path
    settings_path: Path
    precision: str
    build_seconds: float
    tensorrt_version: str


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp16",
                 calibration_batches: Iterable[np.ndarray] | None = None, calibration_cache: Path | None = None,
                 timing_cache: Path | None = None, workspace_mb: int = 2048, min_batch: int = 1,
                 opt_batch: int = 1, max_batch: int = 1) -> EngineBuild:
    """Build a serialized engine for the batch range [min_batch, max_batch], tuned at opt_batch.

    int8 needs calibration data (`calibration_batches`, all of one shape) or an existing
    `calibration_cache`; without either TensorRT would silently keep most layers in higher precision
    and the engine would be int8 in name only. fp16 is enabled alongside int8 so that layers TensorRT
    keeps out of int8 fall back to fp16 rather than fp32, as `trtexec --int8 --fp16` does.
    A timing cache, when given, is read if present and written back after the build, so rebuilding
    similar networks (the profiler's blocks) skips most tactic timing. The engine and a JSON of its
    build settings (beside it, `<engine>.json`) are written atomically: a file at `engine_path` is
    always a complete engine.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise ExportError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExportError(f"batch range must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    if workspace_mb < 1:
        raise ExportError(f"workspace_mb must be positive, got {workspace_mb}")
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    cache_ready = calibration_cache is not None and calibration_cache.is_file()
    if precision == "int8" and calibration_batches is None and not cache_ready:
        raise ExportError("int8 needs calibration data: pass calibration_batches (images as the model takes them) "
                          "or an existing calibration_cache")
    require_tensorrt()
    device = _require_cuda()
    import tensorrt as trt

    logger = _logger()
    first_error = len(_ERRORS)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed: {_one_line(errors) or 'no reason given'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    input_shapes = {t.name: _dims(t.shape) for t in inputs}
    profile = builder.create_optimization_profile()
    dynamic = False
    for name, shape in input_shapes.items():
        if any(d < 0 for d in shape[1:]):
            raise ExportError(f"{onnx_path}: input {name!r} has dynamic dimensions other than the batch {shape}; "
                              "hwnas exports fixed image sizes")
        if shape[0] < 0:
            dynamic = True
            rest = shape[1:]
            profile.set_shape(name, trt.Dims([min_batch, *rest]), trt.Dims([opt_batch, *rest]),
                              trt.Dims([max_batch, *rest]))
        elif not min_batch == opt_batch == max_batch == shape[0]:
            raise ExportError(f"{onnx_path}: input {name!r} has a fixed batch of {shape[0]}, but the build asks for "
                              f"batches {min_batch}..{max_batch}; export with a dynamic batch")
    if dynamic:
        config.add_optimization_profile(profile)

    feed = calibrator = None
    if precision == "int8":
        if len(inputs) != 1:
            raise ExportError(f"{onnx_path}: int8 calibration feeds one input; the model has {len(inputs)}")
        config.set_flag(trt.BuilderFlag.INT8)
        feed = CalibrationFeed(calibration_batches, input_shapes[inputs[0].name])
        if not feed.has_data and not cache_ready:
            raise ExportError("int8 calibration_batches is empty and there is no calibration_cache to use instead")
        if dynamic:
            # With runtime dimensions TensorRT calibrates at the fixed shape of a calibration profile.
            calib_shape = trt.Dims(list(feed.shape))
            calib_profile = builder.create_optimization_profile()
            calib_profile.set_shape(inputs[0].name, calib_shape, calib_shape, calib_shape)
            config.set_calibration_profile(calib_profile)
        # Deprecated since TensorRT 10.1, still honoured (module docstring). The local reference keeps the
        # Python calibrator alive for the whole build, whatever the bindings hold.
        calibrator = make_calibrator(feed, calibration_cache, device)
        config.int8_calibrator = calibrator

    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            # A cache from another TensorRT version or GPU only costs time: start a fresh one.
            print(f"[hwnas] {timing_cache}: timing cache does not match this TensorRT/GPU; starting a new one",
                  file=sys.stderr)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    del calibrator
    if feed is not None and feed.problem:
        raise ExportError(f"{onnx_path}: int8 calibration failed: {feed.problem}")
    if serialized is None:
        reason = _one_line("; ".join(_ERRORS[first_error:])) or "see TensorRT's log above"
        raise ExportError(f"{onnx_path}: TensorRT could not build a {precision} engine: {reason}")

    atomic_write_bytes(engine_path, memoryview(serialized).tobytes())
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()).tobytes())

    import torch

    from exporters.onnx import read_metadata  # here, so importing this module stays cheap

    settings: dict[str, Any] = {
        "engine": engine_path.name,
        "precision": precision,
        "fp16_fallback": precision == "int8",
        "tf32": bool(config.get_flag(trt.BuilderFlag.TF32)),  # TensorRT's default: fp32 convs may use TF32
        "int8_mode": "implicit, entropy calibrator 2 (deprecated since TensorRT 10.1)" if precision == "int8" else None,
        "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch, "dynamic": dynamic},
        "inputs": {name: list(shape) for name, shape in input_shapes.items()},
        "workspace_mb": workspace_mb,
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(device),
        "onnx_file": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "onnx_metadata": {k: v for k, v in read_metadata(onnx_path).items() if k.startswith("hwnas.")},
        "calibration": None if feed is None else {
            "batches": feed.batches_fed,
            "shape": list(feed.shape),
            "cache": str(calibration_cache) if calibration_cache is not None else None,
            "cache_used": feed.cache_used,
        },
        "timing_cache": str(timing_cache) if timing_cache is not None else None,
        "build_seconds": round(build_seconds, 3),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    settings_path = engine_path.with_name(engine_path.name + ".json")
    atomic_write_bytes(settings_path, (json.dumps(settings, indent=2) + "\n").encode())
    return EngineBuild(engine_path=engine_path, settings_path=settings_path, precision=precision,
                       build_seconds=build_seconds, tensorrt_version=trt.__version__)


class EngineRunner:
    """One engine, one execution context, fixed batch: buffers are torch CUDA tensors allocated once,
    and every run is enqueued with `execute_async_v3` on the runner's own torch CUDA stream."""

    def __init__(self, engine_path: str | Path, batch_size: int = 1) -> None:
        require_tensorrt()
        device = _require_cuda()
        import tensorrt as trt
        import torch

        path = Path(engine_path)
        if not path.is_file():
            raise ExportError(f"{path}: no such TensorRT engine")
        if batch_size < 1:
            raise ExportError(f"batch_size must be >= 1, got {batch_size}")
        self.path = path
        self.batch_size = batch_size
        self.device = device
        logger = _logger()
        first_error = len(_ERRORS)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            reason = _one_line("; ".join(_ERRORS[first_error:])) or "not an engine of this TensorRT and GPU"
            raise ExportError(f"{path}: TensorRT {trt.__version__} could not load the engine ({reason}); "
                              "engines only run on the TensorRT version and GPU model that built them")
        context = engine.create_execution_context()
        if context is None:
            raise ExportError(f"{path}: TensorRT could not create an execution context (GPU out of memory?)")
        # Attributes are released in the order they were set: context, then engine, then the runtime that
        # made the engine, which TensorRT requires to outlive it.
        self._context = context
        self._engine = engine
        self._runtime = runtime
        self._stream = torch.cuda.Stream(device=device)

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ExportError(f"{path}: expected one input and at least one output, got {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]

        shape = _dims(engine.get_tensor_shape(self.input_name))
        if shape[0] < 0:
            low, _, high = (_dims(d)[0] for d in engine.get_tensor_profile_shape(self.input_name, 0))
            if not low <= batch_size <= high:
                raise ExportError(f"{path}: the engine takes batches {low}..{high}, not {batch_size}")
            shape = (batch_size, *shape[1:])
            self._context.set_input_shape(self.input_name, trt.Dims(list(shape)))
        elif shape[0] != batch_size:
            raise ExportError(f"{path}: the engine has a fixed batch of {shape[0]}, not {batch_size}")

        self._buffers: dict[str, torch.Tensor] = {}
        for name in names:
            dims = shape if name == self.input_name else _dims(self._context.get_tensor_shape(name))
            dtype = _torch_dtype(engine.get_tensor_dtype(name))
            self._buffers[name] = torch.zeros(dims, dtype=dtype, device=device)
            self._context.set_tensor_address(name, self._buffers[name].data_ptr())
        self.input_shape: tuple[int, ...] = tuple(shape)

    def run(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """The first output (fp32, on the host) for one batch of exactly `batch_size` inputs."""
        import torch

        tensor = torch.as_tensor(x)
        if tuple(tensor.shape) != self.input_shape:
            raise ValueError(f"input shape {tuple(tensor.shape)} does not match the engine's {self.input_shape}")
        inp = self._buffers[self.input_name]
        with torch.cuda.stream(self._stream):
            inp.copy_(tensor.to(dtype=inp.dtype), non_blocking=False)
            self._enqueue()
            out = self._buffers[self.output_name].float().cpu()
        self._stream.synchronize()
        return out.numpy()

    def time(self, warmup: int, repeats: int) -> list[float]:
        """Milliseconds of each of `repeats` runs (after `warmup` untimed ones), from CUDA events on the
        runner's stream; each run starts on an idle stream, so it is the latency of one request,
        launch overhead included, not a pipelined throughput figure."""
        import torch

        if repeats < 1 or warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
        inp = self._buffers[self.input_name]
        with torch.cuda.stream(self._stream):
            inp.copy_(torch.randn(inp.shape, generator=torch.Generator().manual_seed(0)).to(inp.dtype))
            for _ in range(warmup):
                self._enqueue()
            self._stream.synchronize()
            samples = []
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(self._stream)
                self._enqueue()
                end.record(self._stream)
                end.synchronize()
                samples.append(float(start.elapsed_time(end)))
        return samples

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise ExportError(f"{self.path}: TensorRT failed to enqueue the engine")


# ---- helpers ------------------------------------------------------------------------------------------


def _import_problem() -> str | None:
    """Why TensorRT cannot be used here, or None when it can."""
    try:
        import tensorrt
    except ImportError as exc:
        return f"import tensorrt failed: {_one_line(str(exc))}"
    except OSError as exc:  # the wheel is there but its CUDA libraries are not
        return f"import tensorrt failed: {_one_line(str(exc))}"
    if not hasattr(tensorrt, "Builder"):
        return "only its type stubs (tensorrt-stubs) are installed here"
    return None


def _require_cuda() -> torch.device:
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is False)")
    torch.cuda.init()  # TensorRT then works in the same primary CUDA context as torch
    return torch.device("cuda", torch.cuda.current_device())


_ERRORS: list[str] = []  # every error TensorRT logged in this process, in order


@cache
def _logger() -> trt.ILogger:
    """One logger for the process: TensorRT keeps the first logger it is given and ignores later ones.
    Warnings and errors go to stderr; errors are also kept, so a failed build can say why in one line."""
    import tensorrt as trt

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                _ERRORS.append(msg)
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {severity}: {msg}", file=sys.stderr)

    return Logger()


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise ExportError(f"engine tensor of TensorRT type {dtype} has no torch equivalent")
    return table[dtype]


def _one_line(text: str) -> str:
    return " ".join(text.split())
