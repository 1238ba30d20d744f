"""Timing what ships: the exported artifact of a subnet on its profile's backend, in rounds spread over time.

The profiler times blocks and subnets as modules; an export is timed as what the user deploys: the
ONNX file through ONNX Runtime, the TensorRT engine, or the torch module for the torch backends.
Both go through the same backends (`hwnas.latency.backends`), so an export's measured latency and
the table's prediction are timed by one code path.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hwnas.errors import HwnasError
from hwnas.latency.backends import OnnxRuntimeCpuBackend, TensorRTBackend, Timing, get_backend
from hwnas.latency.profiler import combine_timings
from hwnas.latency.profiles import DeviceProfile
from hwnas.latency.quiet import QuietGuard

if TYPE_CHECKING:
    from torch import nn


def artifact_timer(profile: DeviceProfile, *, module: nn.Module, onnx_path: str | Path,
                   engine_path: str | Path | None,
                   input_shape: tuple[int, int, int]) -> tuple[Callable[[], Timing], str]:
    """One round of timing of what `profile` deploys, and a description of that artifact.

    The ONNX file for onnxruntime-cpu (a new session each round), the engine for tensorrt, the
    module itself for the torch backends (whose deployment is the torch model).
    """
    if profile.backend == "onnxruntime-cpu":
        ort_backend = OnnxRuntimeCpuBackend(profile)
        return (lambda: ort_backend.time_onnx(onnx_path, input_shape)), str(onnx_path)
    if profile.backend == "tensorrt":
        if engine_path is None:
            raise HwnasError(f"profile '{profile.name}' times TensorRT engines: export with --format tensorrt")
        trt_backend = TensorRTBackend(profile)
        return (lambda: trt_backend.time_engine(engine_path, input_shape)), str(engine_path)
    backend = get_backend(profile)
    return (lambda: backend.time_module(module, input_shape)), f"torch module ({profile.backend})"


MEASURE_ROUNDS = 16
ROUND_GAP_S = 0.5


def measure_artifact(profile: DeviceProfile, module: nn.Module, onnx_path: Path, input_shape: tuple[int, int, int],
                     engine_path: Path | None = None, rounds: int = MEASURE_ROUNDS,
                     gap_s: float = ROUND_GAP_S, guard: QuietGuard | None = None) -> tuple[Timing, str, list[float]]:
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
    than hidden. With `guard`, the machine is checked quiet first and the others' busy share over
    the rounds is kept in the returned Timing (`others_busy`).
    """
    once, artifact = artifact_timer(profile, module=module, onnx_path=onnx_path, engine_path=engine_path,
                                    input_shape=input_shape)
    if guard is not None:
        guard.wait(f"timing {artifact}")
    timings = []
    with contextlib.ExitStack() as stack:
        busy = stack.enter_context(guard.measuring(f"timing {artifact}")) if guard is not None else []
        for i in range(max(1, rounds)):
            if i:
                time.sleep(gap_s)
            timings.append(once())
    others = busy[0].others if busy else math.nan
    return (combine_timings(timings, profile.statistic, others), artifact,
            [t.value(profile.statistic) for t in timings])


__all__ = ["MEASURE_ROUNDS", "ROUND_GAP_S", "artifact_timer", "measure_artifact"]
