"""The splits of a dataset: labelled images that batch themselves, held in memory or read from files.

Batching does not use a DataLoader: fashion-mnist and CIFAR-10 are small enough to hold as one
uint8 tensor, and a whole batch is gathered, augmented, resized and normalised with a handful of
tensor operations. Worker processes would cost more than that on a 2-core machine, and the bytes
(not floats) are what travels to a GPU.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hwnas.errors import DataError

# ImageNet statistics: an image folder is not decoded in full to measure its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# In-memory splits up to this size are copied to an accelerator once and batched there.
DEVICE_CACHE_BYTES = 2 << 30


class Split(ABC):
    """Labelled images that batch themselves; subclasses only say how to fetch uint8 images.

    Every batch is made the same way whatever the storage: indices (shuffled with a seeded
    `torch.Generator`) -> uint8 images on `device` -> augmentation -> float32 -> resize ->
    normalisation. All random numbers come from that one generator on the CPU, so a seed gives the
    same batches on every device.
    """

    def __init__(self, labels: torch.Tensor, *, native_resolution: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.labels = labels.to(torch.int64)
        self.native_resolution = int(native_resolution)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def in_channels(self) -> int:
        return len(self.mean)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        r = self.native_resolution
        return f"{type(self).__name__}(n={len(self)}, shape={self.in_channels}x{r}x{r})"

    # -- for subclasses --
    @abstractmethod
    def select(self, index: torch.Tensor | Sequence[int]) -> Split:
        """A split of the same storage holding only the rows `index` (no copy of files, a copy of rows)."""

    @abstractmethod
    def _fetch(self, chunks: Sequence[torch.Tensor], device: torch.device
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images (B, C, H, W), int64 labels) on `device`, one pair per chunk of indices."""

    # -- shared --
    def subset(self, n: int, seed: int = 0) -> Split:
        """At most `n` rows drawn without replacement: a few batches for BN recalibration, a quick check."""
        n = min(int(n), len(self))
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=generator)[:n].sort().values
        return self.select(index)

    def num_batches(self, batch_size: int, *, drop_last: bool = False, max_batches: int | None = None) -> int:
        """How many batches `batches` yields with these arguments, for progress bars and LR schedules."""
        count = len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)
        return count if max_batches is None else min(count, max_batches)

    def batches(self, batch_size: int, *, resolution: int | None = None, shuffle: bool = False, seed: int = 0,
                augment: bool = False, drop_last: bool = False, device: str | torch.device = "cpu",
                max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalised float32 images (B, C, r, r), int64 labels (B,)) on `device`.

        Pass a different `seed` each epoch to get a different order and different augmentations;
        the same seed repeats them exactly. `augment` is a random crop with zero padding (4 px per
        32 px of the native size) and a horizontal flip, applied at the native size before resizing.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        device = torch.device(device)
        resolution = self.native_resolution if resolution is None else int(resolution)
        generator = torch.Generator().manual_seed(seed)
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        chunks = [order[start:start + batch_size] for start in range(0, stop, batch_size)]
        if max_batches is not None:
            chunks = chunks[:max(0, max_batches)]
        shape = (1, self.in_channels, 1, 1)
        shift = torch.tensor(self.mean, device=device).mul_(255).view(shape)
        scale = torch.tensor(self.std, device=device).mul_(255).reciprocal_().view(shape)
        for images, labels in self._fetch(chunks, device):
            if augment:
                images = _crop_and_flip(images, generator)
            x = images.to(torch.float32)
            if resolution != x.shape[-1]:
                x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                  antialias=True)
            yield x.sub_(shift).mul_(scale), labels


def _crop_and_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop from a zero-padded batch and random horizontal flip, as one gather on the batch."""
    b, c, h, w = images.shape
    pad = max(1, round(4 * h / 32))
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    flip = torch.rand(b, 1, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = dx + torch.where(flip, cols.flip(0), cols)
    rows = dy + torch.arange(h)
    device = images.device
    rows, cols = rows.to(device), cols.to(device)
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


class TensorSplit(Split):
    """A split held in memory as one uint8 tensor (N, C, H, W): fashion-mnist and CIFAR-10.

    On an accelerator the whole tensor is copied once (when under `DEVICE_CACHE_BYTES`) and batches
    are gathered there, so training ships no bytes per step.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be uint8 (N, C, H, H), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0] or images.shape[1] != len(mean):
            raise ValueError(f"{tuple(images.shape)} images, {tuple(labels.shape)} labels, {len(mean)} channels")
        super().__init__(labels, native_resolution=images.shape[-1], mean=mean, std=std)
        self.images = images
        self._cache: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def select(self, index: torch.Tensor | Sequence[int]) -> TensorSplit:
        index = torch.as_tensor(index, dtype=torch.int64)
        return TensorSplit(self.images[index], self.labels[index], mean=self.mean, std=self.std)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._cache is not None and self._cache[0] == device:
            return self._cache[1], self._cache[2]
        if self.images.nbytes > DEVICE_CACHE_BYTES:
            return None
        images, labels = self.images.to(device), self.labels.to(device)
        self._cache = (device, images, labels)
        return images, labels

    def _fetch(self, chunks: Sequence[torch.Tensor], device: torch.device
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if device.type == "cpu":
            for index in chunks:
                yield self.images[index], self.labels[index]
            return
        cached = self._on(device)
        for index in chunks:
            if cached is not None:
                index = index.to(cached[0].device)
                yield cached[0][index], cached[1][index]
            else:
                images = self.images[index]
                if device.type == "cuda":
                    images = images.pin_memory()
                yield images.to(device, non_blocking=True), self.labels[index].to(device)


class ImageFolderSplit(Split):
    """A split read from image files on demand, each resized (shorter side) and centre-cropped to `size`.

    With `crop` < 1 the shorter side is resized to ceil(size / crop) first and the centre `size` x
    `size` kept: ImageNet's evaluation transform (`crop=0.875`: 256 then 224, as torchvision's
    `Resize` + `CenterCrop` and Once-for-All do it). Batches at another resolution are decoded at
    that resolution, not resized from `size`, so every arch sees the transform at its own size.
    Decoding runs on a few threads (Pillow releases the GIL while decoding and resizing), one batch
    ahead of the consumer. A file that cannot be decoded raises `DataError` when its batch is made.
    """

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, *, size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 workers: int | None = None, crop: float = 1.0) -> None:
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} paths, {labels.shape[0]} labels")
        if not 0.0 < crop <= 1.0:
            raise ValueError(f"crop must be in (0, 1], got {crop}")
        super().__init__(labels, native_resolution=size, mean=mean, std=std)
        self.paths = list(paths)
        self.size = int(size)
        self.crop = float(crop)
        self.workers = workers or min(8, os.cpu_count() or 1)

    def select(self, index: torch.Tensor | Sequence[int]) -> ImageFolderSplit:
        index = torch.as_tensor(index, dtype=torch.int64)
        return ImageFolderSplit([self.paths[i] for i in index.tolist()], self.labels[index], size=self.size,
                                mean=self.mean, std=self.std, workers=self.workers, crop=self.crop)

    def at(self, size: int) -> ImageFolderSplit:
        """The same images decoded at `size`."""
        return ImageFolderSplit(self.paths, self.labels, size=size, mean=self.mean, std=self.std,
                                workers=self.workers, crop=self.crop)

    def batches(self, batch_size: int, *, resolution: int | None = None, shuffle: bool = False, seed: int = 0,
                augment: bool = False, drop_last: bool = False, device: str | torch.device = "cpu",
                max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        split = self if resolution is None or int(resolution) == self.size else self.at(int(resolution))
        return Split.batches(split, batch_size, resolution=resolution, shuffle=shuffle, seed=seed, augment=augment,
                             drop_last=drop_last, device=device, max_batches=max_batches)

    def read(self, i: int) -> np.ndarray:
        """Image `i` as uint8 (size, size, 3); the same transform for training and evaluation."""
        from PIL import Image, ImageOps, UnidentifiedImageError

        path, size = self.paths[i], self.size
        side = size if self.crop >= 1.0 else math.ceil(size / self.crop)
        try:
            with Image.open(path) as image:
                image.draft("RGB", (side, side))  # JPEG: let the decoder downscale
                rgb = image.convert("RGB")
                if self.crop >= 1.0:
                    return np.asarray(ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
                w, h = rgb.size  # torchvision's Resize(side) on the shorter side, then CenterCrop(size)
                new_w, new_h = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
                resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
                left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
                return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: cannot decode image ({exc})") from None

    def _fetch(self, chunks: Sequence[torch.Tensor], device: torch.device
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hwnas-data")

        def submit(index: torch.Tensor) -> list[Future[np.ndarray]]:
            return [pool.submit(self.read, i) for i in index.tolist()]

        try:
            pending = submit(chunks[0]) if chunks else []
            for k, index in enumerate(chunks):
                arrays = [f.result() for f in pending]
                pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
                images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
                if device.type == "cuda":
                    images = images.pin_memory()
                yield images.to(device, non_blocking=True), self.labels[index].to(device)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Dataset:
    """A dataset with its three splits and the constants a model and an exporter need.

    `mean` and `std` are per channel on the [0, 1] scale: the normalisation `batches` applies and
    an exported model's input expects.
    """

    name: str
    in_channels: int
    num_classes: int
    native_resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...] = field(default=())
    spec: str = ""
    # True when `val` was drawn from the training set (the size `load_dataset`'s val_size asked for), False when it
    # is a folder of its own (an image folder's DIR/val beside DIR/test): what a caller says about the split
    val_carved: bool = True
    # why a class has no training images left (a tiny class folder carved into the held-out splits), or '':
    # training refuses such data; search and export only use the training split for BN statistics
    untrained: str = ""


__all__ = ["DEVICE_CACHE_BYTES", "IMAGENET_MEAN", "IMAGENET_STD", "Dataset", "ImageFolderSplit", "Split",
           "TensorSplit"]
