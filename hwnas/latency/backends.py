"""Timing backends: one runner per deploy runtime, each timing a module as that runtime would run it.

Every backend runs `warmup` untimed calls, then times `repeats` calls one by one and summarises the
samples robustly (`Timing`: median and p10/p90 rather than a mean that one preempted call drags).
On the CPU each call is timed with `time.perf_counter_ns` with the garbage collector paused, so a
collection never lands inside a sample; thread counts are fixed from the profile. On a GPU each
call is bracketed by a pair of CUDA events recorded back to back on the stream, with one
synchronisation at the end: the samples are the stream's own time, not the wall clock around
launches that return before the work is done.

Load from other processes on a shared machine only adds time and comes in bursts. Within a call
the median ignores preempted samples; a burst that outlasts the call (another job's test run, for
seconds) moves the whole call, and only timing the module again later and keeping the least
disturbed round removes it: on a shared 2-core machine, one pass over mbv3-32's blocks differed
from another by 7 % (std, up to 40 % on a block), while the minimum over 3 passes spread across the
whole space differed from another such minimum by 1 %. A sleep would only let the CPU clock down.
"""

from __future__ import annotations

import copy
import gc
import math
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hwnas.errors import HwnasError
from hwnas.latency.cuda_timing import CudaGraphRunner, HeuristicKernels, cuda_event_samples
from hwnas.latency.profiles import BACKENDS, DeviceProfile, load_profile

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["BACKENDS", "Backend", "CudaGraphRunner", "Timing", "get_backend", "time_calls"]

SEED = 0  # inputs are random but the same in every run: values do not change latency, NaNs might


@dataclass(frozen=True)
class Timing:
    """A robust summary of one module's latency samples, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    n: int
    min_ms: float = math.nan  # NaN where only a summary was kept (e.g. rounds combined by the profiler)
    rounds: int = 1  # rounds combined into this one (the quickest is what the other fields describe)
    others_busy: float = math.nan  # the others' busy share of the CPUs while it was timed (hwnas.latency.quiet)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        """Percentiles by linear interpolation between order statistics (numpy's default)."""
        samples = np.asarray(samples_ms, dtype=np.float64)
        if samples.ndim != 1 or samples.size == 0:
            raise ValueError(f"need a non-empty list of samples, got shape {samples.shape}")
        if not np.all(np.isfinite(samples)) or np.any(samples < 0):
            raise ValueError("latency samples must be finite and >= 0")
        p10, median, p90 = np.percentile(samples, [10, 50, 90])
        return cls(median_ms=float(median), p10_ms=float(p10), p90_ms=float(p90), mean_ms=float(samples.mean()),
                   n=int(samples.size), min_ms=float(samples.min()))

    def value(self, statistic: str) -> float:
        """The profile's statistic: median (default), mean or min."""
        if statistic == "median":
            return self.median_ms
        if statistic == "mean":
            return self.mean_ms
        if statistic == "min":
            if math.isnan(self.min_ms):
                raise ValueError("this Timing kept no minimum (it was combined from summaries)")
            return self.min_ms
        raise ValueError(f"unknown statistic {statistic!r}; choose median, mean or min")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(Protocol):
    """Times a module on one runtime, at the batch size, precision and threads of its profile."""

    name: str

    def time_module(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        """`input_shape` is (C, H, W) of one sample; the batch comes from the profile."""
        ...


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) of positive sizes, got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


MIN_REPEATS = 10  # a time-capped round still times this many calls (fewer only if `repeats` is smaller)


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, round_ms: float = 0) -> list[float]:
    """Wall-clock samples (ms) of `fn` after `warmup` untimed calls, GC paused while timing.

    With `round_ms` > 0 the round is time-capped: the warm-up's last call sizes it to at most
    `round_ms` of calls (no fewer than MIN_REPEATS, no more than `repeats`), and the warm-up shrinks
    in proportion, so a 20 ms subnet costs a round what a 0.2 ms block does.
    """
    if round_ms > 0 and warmup > 0:
        start = time.perf_counter_ns()
        fn()
        first = (time.perf_counter_ns() - start) / 1e6
        calls = int(max(min(MIN_REPEATS, repeats), min(repeats, round_ms / max(first, 1e-6))))
        warmup = max(0, min(warmup, round(warmup * calls / repeats)) - 1)
        repeats = calls
    for _ in range(warmup):
        fn()
    samples = [0] * repeats
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            start = clock()
            fn()
            samples[i] = clock() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return [s / 1e6 for s in samples]


def _random_input(batch: int, shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((batch, *shape)).astype(np.float32)


# ---- CPU ----------------------------------------------------------------------------------------------------
class OnnxRuntimeCpuBackend:
    """The module exported to ONNX (fp32, static batch) and run by ONNX Runtime's CPU provider.

    The session is `exporters.onnx.ort_session`'s: `threads` intra-op threads, one inter-op thread,
    sequential execution, every graph optimisation. Export and session are made once per module
    and input shape and kept while the module lives (the profiler times each block in several
    rounds); a module whose structure changes in place must be timed after `clear()`.

    An int8 profile quantizes each exported module as `hwnas export --precision int8` quantizes a
    subnet (`exporters.onnx_int8.DEFAULT_SETTINGS`: static QDQ, the same types, per-channel and
    reduce_range), so the session runs the same fused integer kernels. Calibration decides only the
    scales, never the graph or the kernels, so a few random batches calibrate a block (MinMax: no
    histograms to build).
    """

    name = "onnxruntime-cpu"

    def __init__(self, profile: DeviceProfile) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise HwnasError(f"{profile.where}: backend onnxruntime-cpu needs onnxruntime ({exc})") from None
        if "CPUExecutionProvider" not in ort.get_available_providers():
            raise HwnasError(f"{profile.where}: this onnxruntime build has no CPUExecutionProvider")
        _export_module()  # fail now, not at the first block
        self.profile = profile
        self._sessions: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]] = weakref.WeakKeyDictionary()

    def session(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Any:
        """The ONNX Runtime session this backend runs for `module` (made on first use, then kept)."""
        shape = _check_shape(input_shape)
        per_module = self._sessions.setdefault(module, {})
        if shape not in per_module:
            from exporters.onnx import ort_session

            with tempfile.TemporaryDirectory(prefix="hwnas-ort-") as tmp:
                path = _export_module()(module, Path(tmp) / "module.onnx", shape,
                                        batch_size=self.profile.batch_size, dynamic_batch=False)
                if self.profile.precision == "int8":
                    path = _quantized(path, self.profile.batch_size, shape)
                # The session holds the model in memory: the file can go with the directory.
                per_module[shape] = ort_session(path, threads=self.profile.threads,
                                                providers=["CPUExecutionProvider"])
        return per_module[shape]

    def time_module(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        shape = _check_shape(input_shape)
        return self._time_session(self.session(module, shape), shape)

    def time_onnx(self, path: str | Path, input_shape: tuple[int, int, int]) -> Timing:
        """End-to-end latency of an ONNX file (an exported subnet, as it ships) in a new session per call."""
        from exporters.onnx import ort_session

        shape = _check_shape(input_shape)
        session = ort_session(path, threads=self.profile.threads, providers=["CPUExecutionProvider"])
        return self._time_session(session, shape)

    def _time_session(self, session: Any, shape: tuple[int, int, int]) -> Timing:
        feed = {session.get_inputs()[0].name: _random_input(self.profile.batch_size, shape)}
        outputs = [o.name for o in session.get_outputs()]
        samples = time_calls(lambda: session.run(outputs, feed), self.profile.warmup, self.profile.repeats,
                             self.profile.round_ms)
        return Timing.from_samples(samples)

    def clear(self) -> None:
        self._sessions.clear()


INT8_CALIBRATION_BATCHES = 4


def _quantized(path: Path, batch: int, shape: tuple[int, int, int]) -> Path:
    """`path` quantized beside itself with the exporter's int8 settings, calibrated on a few random batches."""
    from exporters.onnx_int8 import DEFAULT_SETTINGS, quantize_onnx

    images = INT8_CALIBRATION_BATCHES * batch
    settings = DEFAULT_SETTINGS.with_calibration("minmax", images)
    rng = np.random.default_rng(SEED)
    batches = [rng.standard_normal((batch, *shape)).astype(np.float32) for _ in range(INT8_CALIBRATION_BATCHES)]
    return quantize_onnx(path, path.with_suffix(".int8.onnx"), batches, settings).path


def _export_module() -> Callable[..., Path]:
    try:
        from exporters.onnx import export_module
    except ImportError as exc:
        raise HwnasError(f"ONNX export is unavailable ({exc}); install hwnas with its exporters package") from None
    return export_module


def _torch_copy(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """A private eval-mode copy in the profile's device, dtype and layout: the caller's module is untouched."""
    import torch

    model = copy.deepcopy(module).eval().to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _torch_input(batch: int, shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                 channels_last: bool) -> torch.Tensor:
    import torch

    x = torch.from_numpy(_random_input(batch, shape)).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class TorchCpuBackend:
    """Eager PyTorch on the CPU under `inference_mode`, with `torch.set_num_threads(threads)`.

    The thread count is set for the timing only and restored after, so that profiling inside a
    training process leaves the process as it found it.
    """

    name = "torch-cpu"

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile

    def time_module(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        import torch

        shape = _check_shape(input_shape)
        cpu = torch.device("cpu")
        model = _torch_copy(module, cpu, torch.float32, self.profile.channels_last)
        x = _torch_input(self.profile.batch_size, shape, cpu, torch.float32, self.profile.channels_last)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.profile.threads)
        try:
            with torch.inference_mode():
                samples = time_calls(lambda: model(x), self.profile.warmup, self.profile.repeats,
                                     self.profile.round_ms)
        finally:
            torch.set_num_threads(previous)
        return Timing.from_samples(samples)


# ---- CUDA ---------------------------------------------------------------------------------------------------
class TorchCudaBackend:
    """Eager PyTorch on a CUDA GPU: fp16 by `.half()` (or fp32), channels_last if asked, inference_mode."""

    name = "torch-cuda"

    def __init__(self, profile: DeviceProfile) -> None:
        import torch

        from hwnas.latency.device import require_cuda

        self.profile = profile
        self.device = torch.device("cuda", require_cuda(profile))
        self.dtype = torch.float16 if profile.precision == "fp16" else torch.float32

    def prepare(self, module: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Module, torch.Tensor]:
        """The module as this backend runs it, and an input of the profile's batch (for checks and tests)."""
        shape = _check_shape(input_shape)
        cl = self.profile.channels_last
        return (_torch_copy(module, self.device, self.dtype, cl),
                _torch_input(self.profile.batch_size, shape, self.device, self.dtype, cl))

    def time_module(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        import torch

        model, x = self.prepare(module, input_shape)
        with torch.cuda.device(self.device), HeuristicKernels(), torch.inference_mode():
            samples = cuda_event_samples(lambda: model(x), self.profile.warmup, self.profile.repeats, self.device)
        return Timing.from_samples(samples)


class TorchCudaGraphBackend(TorchCudaBackend):
    """PyTorch with one forward captured in a CUDA graph and timed by replay: GPU time without launch cost."""

    name = "torch-cuda-graph"

    def time_module(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        import torch

        model, x = self.prepare(module, input_shape)
        with torch.cuda.device(self.device), HeuristicKernels():
            runner = CudaGraphRunner(model, x)
            samples = cuda_event_samples(runner.replay, self.profile.warmup, self.profile.repeats, self.device)
        del runner
        return Timing.from_samples(samples)


class TensorRTBackend:
    """A TensorRT engine per module (from its static-batch ONNX export) at the profile's precision.

    Engines take seconds to build, so each is built once per module and input shape and kept while
    the module lives (the profiler times each block in several rounds), and all builds of one
    backend share a timing cache: a 1x1 convolution that recurs in many blocks is tuned once. int8
    is calibrated on random inputs: the scales it finds change no kernel's speed.
    """

    name = "tensorrt"

    def __init__(self, profile: DeviceProfile) -> None:
        from hwnas.latency.device import require_cuda

        require_cuda(profile)
        try:
            from exporters.tensorrt import require_tensorrt
        except ImportError as exc:
            raise HwnasError(f"{profile.where}: backend tensorrt needs exporters.tensorrt ({exc})") from None
        require_tensorrt()
        _export_module()
        self.profile = profile
        self._workdir = tempfile.TemporaryDirectory(prefix="hwnas-trt-")
        self.timing_cache = Path(self._workdir.name) / "timing.cache"
        self._engines: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]] = weakref.WeakKeyDictionary()
        self._files: dict[tuple[Path, int], Any] = {}  # engine files' runners, by path and modification time
        self._built = 0

    def runner(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Any:
        """The `EngineRunner` of `module`'s engine (built on first use, then kept)."""
        from exporters.tensorrt import EngineRunner, build_engine

        shape = _check_shape(input_shape)
        per_module = self._engines.setdefault(module, {})
        if shape not in per_module:
            batch = self.profile.batch_size
            self._built += 1
            onnx_path = Path(self._workdir.name) / f"module{self._built}.onnx"
            engine_path = onnx_path.with_suffix(".engine")
            _export_module()(module, onnx_path, shape, batch_size=batch, dynamic_batch=False)
            calibration = [_random_input(batch, shape)] * 4 if self.profile.precision == "int8" else None
            build_engine(onnx_path, engine_path, precision=self.profile.precision, calibration_batches=calibration,
                         timing_cache=self.timing_cache, min_batch=batch, opt_batch=batch, max_batch=batch)
            per_module[shape] = EngineRunner(engine_path, batch)  # the engine is in memory now
            for leftover in (onnx_path, engine_path, engine_path.with_name(engine_path.name + ".json")):
                leftover.unlink(missing_ok=True)
        return per_module[shape]

    def time_module(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Timing:
        runner = self.runner(module, input_shape)
        return Timing.from_samples(runner.time(self.profile.warmup, self.profile.repeats))

    def time_engine(self, path: str | Path, input_shape: tuple[int, int, int]) -> Timing:
        """Latency of a built engine file (an exported subnet, as it ships); the engine is loaded on the
        first call and kept until the file changes."""
        from exporters.tensorrt import EngineRunner

        shape = _check_shape(input_shape)
        path = Path(path)
        key = (path, path.stat().st_mtime_ns if path.is_file() else -1)
        if key not in self._files:
            self._files[key] = EngineRunner(path, self.profile.batch_size)  # no file: an ExportError naming it
        runner = self._files[key]
        if runner.input_shape != (self.profile.batch_size, *shape):
            raise HwnasError(f"{path}: the engine takes inputs of shape {runner.input_shape}, "
                             f"not {(self.profile.batch_size, *shape)}")
        return Timing.from_samples(runner.time(self.profile.warmup, self.profile.repeats))

    def clear(self) -> None:
        self._engines.clear()
        self._files.clear()


_CLASSES: dict[str, type] = {
    "onnxruntime-cpu": OnnxRuntimeCpuBackend,
    "torch-cpu": TorchCpuBackend,
    "torch-cuda": TorchCudaBackend,
    "torch-cuda-graph": TorchCudaGraphBackend,
    "tensorrt": TensorRTBackend,
}
assert set(_CLASSES) == set(BACKENDS)


def get_backend(profile: DeviceProfile | str | Path) -> Backend:
    """The runner of `profile`'s backend; a HwnasError if its runtime or device is missing here,
    or the device is not the one the profile's `expect` asks for."""
    if not isinstance(profile, DeviceProfile):
        profile = load_profile(profile)
    backend: Backend = _CLASSES[profile.backend](profile)
    if profile.expect:
        from hwnas.latency.device import check_expectations, fingerprint

        check_expectations(profile, fingerprint(profile))
    return backend
