"""int8 calibration for TensorRT engines: the calibration images, checked up front, and the calibrator
that feeds them to TensorRT.

TensorRT's implicit int8 quantisation runs an entropy calibrator (`IInt8EntropyCalibrator2`) during
the build: it asks for one device batch at a time and may read or write a calibration cache, so a
rebuild can skip the images. The calibrator runs inside TensorRT, which swallows its exceptions, so
what went wrong is recorded on the `CalibrationFeed` and raised by `exporters.tensorrt.build_engine`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hwnas.errors import ExportError
from hwnas.fileio import atomic_write_bytes

if TYPE_CHECKING:
    import tensorrt as trt
    import torch
    from typing_extensions import Buffer


class CalibrationFeed:
    """The calibration data, checked for shape up front, and what became of it: the calibrator runs
    inside TensorRT, where an exception would be lost, so problems are recorded here for `build_engine`."""

    def __init__(self, batches: Iterable[np.ndarray] | None, input_shape: tuple[int, ...]) -> None:
        self.problem = ""
        self.batches_fed = 0
        self.cache_used = False
        self._iter: Iterator[np.ndarray] = iter(batches if batches is not None else ())
        self._first: np.ndarray | None = next(self._iter, None)
        if self._first is not None:
            first = np.asarray(self._first)
            if first.ndim != len(input_shape) or tuple(first.shape[1:]) != input_shape[1:]:
                raise ExportError(f"calibration batches have shape {first.shape}, the model takes (N, "
                                  f"{', '.join(map(str, input_shape[1:]))})")
            if input_shape[0] > 0 and first.shape[0] != input_shape[0]:
                raise ExportError(f"calibration batches hold {first.shape[0]} images; the model's batch is fixed "
                                  f"at {input_shape[0]}")
            self.shape: tuple[int, ...] = tuple(first.shape)
        else:
            self.shape = (max(input_shape[0], 1), *input_shape[1:])

    @property
    def has_data(self) -> bool:
        return self._first is not None or self.batches_fed > 0

    def next_batch(self) -> np.ndarray | None:
        batch: np.ndarray | None
        if self._first is not None:
            batch, self._first = self._first, None
        else:
            batch = next(self._iter, None)
        if batch is None:
            return None
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape != self.shape:
            self.problem = (f"calibration batch {self.batches_fed + 1} has shape {batch.shape}, the first had "
                            f"{self.shape}; give batches of one size (drop or pad the last)")
            return None
        self.batches_fed += 1
        return batch


def make_calibrator(feed: CalibrationFeed, cache_path: Path | None,
                    device: torch.device) -> trt.IInt8EntropyCalibrator2:
    """TensorRT's entropy calibrator fed from `feed`; the subclass is made here because its base class
    exists only once tensorrt is imported."""
    import tensorrt as trt
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._device_batch: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return feed.shape[0]

        def get_batch(self, names: list[str]) -> list[int]:
            batch = feed.next_batch()
            if batch is None:
                return []  # no more data: TensorRT finishes calibration
            self._device_batch = torch.from_numpy(batch).to(device)
            torch.cuda.synchronize(device)
            return [int(self._device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:  # None: "no cache, calibrate"
            if cache_path is not None and cache_path.is_file():
                feed.cache_used = True
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Buffer) -> None:
            if cache_path is not None:
                atomic_write_bytes(cache_path, memoryview(cache).tobytes())

    return Calibrator()
