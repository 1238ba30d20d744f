"""What hwnas does to an image before the network sees it, as a record an exported model carries.

An exported network is only right behind the preprocessing it was trained and scored with: the
same colour mode, resize, scale and per-channel mean and std, and the class names in the order of
its outputs. Those live in `hwnas.data` (the `Split` that batches the images), which a deployment
machine does not have. `preprocessing_for` reads them off the split the export measures its test
accuracy on, at the arch's resolution, so the record says exactly what that measurement saw:

- in-memory datasets (fashion-mnist, CIFAR-10; `TensorSplit`) hold square uint8 images at their
  native size; a batch at another resolution is the whole image resized by bilinear interpolation
  with antialiasing (`torch.nn.functional.interpolate(..., antialias=True)` on the float pixels,
  which PIL's `Image.resize(..., BILINEAR)` reproduces to one grey level), then divided by 255 and
  normalised per channel;
- image folders (`ImageFolderSplit`) decode each file at the resolution asked for: Pillow's JPEG
  draft mode (a power-of-two downscale in the decoder, never below the size), RGB, then
  `ImageOps.fit` to the size (shorter side resized, centre cropped, bilinear), or with `crop` < 1
  the shorter side resized to ceil(size / crop) and the centre size x size kept; then / 255 and
  normalised.

The record is plain JSON-able data (`to_dict`), so the ONNX file and deploy.json can carry it and a
dozen lines of PIL, numpy and ONNX Runtime can apply it (the README's snippet).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hwnas.data.splits import Dataset, ImageFolderSplit, TensorSplit

PIXEL_SCALE = 1.0 / 255.0  # uint8 pixels to [0, 1], before the mean and std (which are on that scale)
RESIZES = ("resize", "fit", "shorter_side_then_center_crop")
_MODES = {1: ("L", "grayscale"), 3: ("RGB", "RGB")}


@dataclass(frozen=True)
class Preprocessing:
    """How to turn an image file into the input of an exported model, and how to read its output.

    `color` is the PIL mode to convert to ("L": one grayscale channel, "RGB": three channels in
    that order). `resize` is one of `RESIZES`: "resize" (the whole image to height x width: the
    dataset's images are square), "fit" (`PIL.ImageOps.fit`: the shorter side to the size, the
    centre kept; the same as "resize" for a square image), "shorter_side_then_center_crop" (the
    shorter side to `shorter_side`, the longer to int(shorter_side * long / short), both bilinear;
    then the centre height x width, from round((w - width) / 2), round((h - height) / 2)). Then
    x = pixel * `scale`, (x - mean) / std per channel, laid out N, C, H, W.
    """

    input_name: str
    input_shape: tuple[str | int, int, int, int]  # (N, C, H, W); N is "batch" for a dynamic batch
    color: str
    channel_order: str
    resize: str
    shorter_side: int
    crop_fraction: float
    jpeg_draft: bool  # Pillow's draft mode decoded JPEG files (Image.draft(color, (shorter_side,) * 2))
    source_size: tuple[int, int] | None  # (H, W) of the dataset's own images where they all have one
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    dataset: str
    steps: tuple[str, ...]  # the same, in words, in order
    interpolation: str = "bilinear"
    antialias: bool = True
    scale: float = PIXEL_SCALE
    dtype: str = "float32"
    layout: str = "NCHW"

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the network's input."""
        return int(self.input_shape[2]), int(self.input_shape[3])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("input_shape", "source_size", "mean", "std", "classes", "steps"):
            data[key] = None if data[key] is None else list(data[key])
        return data


def preprocessing_for(dataset: Dataset, resolution: int, *, input_name: str = "input",
                      batch: str | int = "batch") -> Preprocessing | None:
    """The preprocessing `dataset`'s test split applies at `resolution` (what an export's test accuracy saw).

    None for a split kind hwnas does not know the transform of (a user's own `Split`): no record
    rather than a wrong one.
    """
    split = dataset.test
    channels = dataset.in_channels
    color, order = _MODES.get(channels, ("", f"{channels} channels as stored"))
    size = int(resolution)
    classes = tuple(str(c) for c in dataset.classes) or tuple(str(i) for i in range(dataset.num_classes))
    norm = (f"x = pixel / 255 (uint8 to [0, 1]), then (x - mean) / std per channel, mean {_floats(dataset.mean)}, "
            f"std {_floats(dataset.std)}")
    layout = f"float32, laid out (N, {channels}, {size}, {size}) as input '{input_name}'"
    if isinstance(split, TensorSplit):
        native = split.native_resolution
        steps = (f"convert to PIL mode {color or '?'} ({order}); the dataset's images are {native}x{native}",
                 f"resize the whole image to {size}x{size}, bilinear with antialiasing (hwnas: torch interpolate "
                 f"with antialias=True on the float pixels; PIL Image.resize BILINEAR agrees within one grey level)"
                 + ("; at this size the dataset's own images are not resized" if native == size else ""),
                 norm, layout)
        return Preprocessing(input_name=input_name, input_shape=(batch, channels, size, size), color=color,
                             channel_order=order, resize="resize", shorter_side=size, crop_fraction=1.0,
                             jpeg_draft=False, source_size=(native, native), mean=dataset.mean, std=dataset.std,
                             classes=classes, dataset=dataset.name, steps=steps)
    if isinstance(split, ImageFolderSplit):
        crop = float(split.crop)
        side = size if crop >= 1.0 else math.ceil(size / crop)
        decode = (f"open with Pillow, JPEG in draft mode (Image.draft('RGB', ({side}, {side})): the decoder "
                  f"downscales by a power of two, never below {side}), convert to RGB")
        if crop >= 1.0:
            resize = (f"PIL ImageOps.fit to {size}x{size}, bilinear (the centred square of the image, resized; "
                      "antialiased as PIL resizes)")
        else:
            resize = (f"resize the shorter side to {side} (= ceil({size} / {crop:g})), the longer one to "
                      f"int({side} * long / short), PIL BILINEAR; keep the centre {size}x{size} from "
                      f"(round((w - {size}) / 2), round((h - {size}) / 2))")
        return Preprocessing(input_name=input_name, input_shape=(batch, 3, size, size), color="RGB",
                             channel_order="RGB", resize="fit" if crop >= 1.0 else "shorter_side_then_center_crop",
                             shorter_side=side, crop_fraction=crop, jpeg_draft=True, source_size=None,
                             mean=dataset.mean, std=dataset.std, classes=classes, dataset=dataset.name,
                             steps=(decode, resize, norm, layout))
    return None


def _floats(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


__all__ = ["PIXEL_SCALE", "RESIZES", "Preprocessing", "preprocessing_for"]
