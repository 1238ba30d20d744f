"""Timing on a CUDA GPU: the stream's own time from CUDA event pairs, CUDA-graph replay, cuDNN's heuristic kernels.

Shared by the torch CUDA backends and the TensorRT engine runner's callers: a sample is what the
stream took between two events recorded back to back around the work, read after one
synchronisation, so the CPU never stalls the stream between samples.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


class HeuristicKernels:
    """cuDNN's heuristic algorithm choice for the timing (no autotuning), restored after.

    With `cudnn.benchmark` each process times candidate kernels afresh and may pick another one for
    the same shape, so a block measured in the profiler and the same block inside a validated
    network could run different kernels; the heuristic choice is the same in every process.
    """

    def __enter__(self) -> None:
        import torch

        self.benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.backends.cudnn.benchmark = self.benchmark


def cuda_event_samples(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """GPU time (ms) of each of `repeats` calls of `fn`, from CUDA event pairs on the current stream.

    All events are recorded back to back and read after one synchronisation, so the CPU never
    stalls the stream between samples; a sample is what the stream took from the start event to
    the end event, idle gaps while the CPU was still launching included.
    """
    import torch

    for _ in range(warmup):
        fn()
    stream = torch.cuda.current_stream(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for start, end in zip(starts, ends, strict=True):
            start.record(stream)
            fn()
            end.record(stream)
        torch.cuda.synchronize(device)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]


class CudaGraphRunner:
    """One forward of `model` captured in a CUDA graph, replayed on a static input and output.

    Captured under `no_grad` rather than `inference_mode`: the replayed kernels are the same, and
    torch's graph machinery has mishandled inference tensors created at a first capture.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 3) -> None:
        import torch

        self.device = example.device
        self.static_input = example.clone()
        with torch.cuda.device(self.device), torch.no_grad():
            # Lazy initialisation (cuDNN/cuBLAS handles, workspaces) must happen before capture, and
            # on a side stream, as torch.cuda.graph's documentation prescribes.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    model(self.static_input)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_output = model(self.static_input)
        torch.cuda.synchronize(self.device)

    def replay(self) -> None:
        self.graph.replay()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Copy `x` into the static input, replay, and return (a reference to) the static output."""
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output
