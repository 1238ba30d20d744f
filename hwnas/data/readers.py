"""Datasets by name: the file formats hwnas reads, and the validation split carved from training.

`load_dataset("fashion-mnist")` reads Debian's files; `fashion-mnist:DIR`, `cifar10:DIR` and
`imagefolder:DIR[?size=N&crop=F]` read a directory. Every reader checks what it reads and names the file
and what is wrong with it in a `DataError`. The validation split is carved from the training set
with a seed, so a search can rank subnets without ever touching the test split. Where the splits
are not the format's own (an image folder without DIR/test), a `SplitNotice` warning says once how
they were made: a user who put images in DIR/val must learn that they became the test split.
"""

from __future__ import annotations

import gzip
import math
import pickle
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from hwnas.data.splits import IMAGENET_MEAN, IMAGENET_STD, Dataset, ImageFolderSplit, Split, TensorSplit
from hwnas.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# (name of the split's file, number of dimensions of its idx array)
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGEFOLDER_DEFAULT_SIZE = 224
# The default validation split: DEFAULT_VAL_SIZE images or DEFAULT_VAL_FRACTION of the training set, whichever
# is smaller. 5000 is what fashion-mnist and CIFAR-10 have always held out (10 % of them is more); a folder of a
# few hundred images keeps 90 % of them to train on instead of being refused.
DEFAULT_VAL_SIZE = 5000
DEFAULT_VAL_FRACTION = 0.1
# The seed of the test split carved from DIR/train when an image folder has no DIR/val or DIR/test: fixed, not the
# validation seed, so that another validation seed never moves a test image into training.
IMAGEFOLDER_TEST_SEED = 104_729


class SplitNotice(UserWarning):
    """How a dataset's splits were made, where that is not the format's own (an image folder without DIR/test)."""


Loader = Callable[[str, int | float | None, int], Dataset]


def dataset_names() -> list[str]:
    """The names `load_dataset` accepts before the colon."""
    return sorted(_LOADERS)


def load_dataset(spec: str = "fashion-mnist", *, val_size: int | float | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by spec: `fashion-mnist`, `fashion-mnist:DIR`, `cifar10:DIR`, `imagefolder:DIR[?size=N&crop=F]`.

    `val_size` images of the training set (an int >= 1: a count; a float in (0, 1): a fraction;
    None: `default_val_count`, 5000 or 10 % of the training images, whichever is smaller) become
    the validation split, drawn at random with `seed`; the rest is the training split. The same
    seed gives the same split, and the two never share an image. `imagefolder` with both DIR/val
    and DIR/test uses DIR/val as given and ignores `val_size`; with DIR/val alone DIR/val is the
    test split; with neither, a test split of the same size is carved from DIR/train first (with
    `IMAGEFOLDER_TEST_SEED`). The last two say so in a `SplitNotice` warning.
    """
    name, _, arg = spec.partition(":")
    name = name.strip().lower()
    if name not in _LOADERS:
        raise DataError(f"unknown dataset '{name}' in '{spec}'; known: {', '.join(dataset_names())}")
    dataset = _LOADERS[name](arg, val_size, seed)
    dataset.spec = spec
    return dataset


def default_val_count(total: int) -> int:
    """The validation split when none is asked for: `DEFAULT_VAL_SIZE` or `DEFAULT_VAL_FRACTION` of `total` images,
    whichever is smaller, and at least one image."""
    return max(1, min(DEFAULT_VAL_SIZE, int(total * DEFAULT_VAL_FRACTION)))


def check_val_size(val_size: int | float | None) -> None:
    """Refuse a `--val-size` that is neither a count (a whole number >= 1) nor a fraction in (0, 1), before any
    data is read; None (the default) passes. Train, search and export requests all check it here."""
    if val_size is None:
        return
    if isinstance(val_size, bool) or not isinstance(val_size, int | float) or not (
            0 < val_size < 1 or (val_size >= 1 and float(val_size).is_integer())):
        raise DataError(f"--val-size must be a number of images (>= 1) or a fraction in (0, 1), got {val_size}")


LEGACY_VAL_SIZE = 5000  # what every checkpoint trained before checkpoints recorded their split held out


def first_val_size(*candidates: object) -> int | float:
    """The first of `candidates` that is a `--val-size` (a count or a fraction; a whole number as a count), else
    `LEGACY_VAL_SIZE`. Search and export hold out the split asked for, else the one the run record or the
    checkpoint says training held out, so that they never score subnets on images the supernet trained on."""
    for value in candidates:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value) if float(value).is_integer() else float(value)
    return LEGACY_VAL_SIZE


def _val_count(val_size: int | float | None, total: int, where: object) -> int:
    """How many of `total` training images `val_size` holds out; every refusal advises a value that would work."""
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int | float)):
        raise DataError(f"val_size must be an int (count) or a float (fraction), got {val_size!r}")
    if total < 2:
        raise DataError(f"{where}: {total} training image(s): too few to hold out a validation split and keep "
                        "images to train on (at least 2 needed: add images)")
    if val_size is None:
        return default_val_count(total)
    suggestion = default_val_count(total)
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise DataError(f"{where}: val_size as a fraction must be in (0, 1), got {val_size} (pass a count such "
                            f"as {suggestion} or a fraction such as 0.1)")
        count = min(round(val_size * total), total - 1)
        if count < 1:
            raise DataError(f"{where}: val_size {val_size} of the {total} training images is no image (pass a larger "
                            f"fraction or a count such as {suggestion})")
        return count
    if not 1 <= val_size < total:
        raise DataError(f"{where}: val_size {val_size} must be in [1, {total - 1}]: the training set has {total} "
                        f"images (pass a smaller count such as {suggestion} or a fraction such as 0.1)")
    return val_size


def _carve(split: Split, val_size: int | float | None, seed: int, where: object) -> tuple[Split, Split]:
    """Split off a seeded random validation set; both keep the original order of their rows."""
    k = _val_count(val_size, len(split), where)
    return _take(split, k, seed)


def _take(split: Split, k: int, seed: int) -> tuple[Split, Split]:
    """(the rest, `k` rows drawn with `seed`), both in the original order of their rows."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.select(order[k:].sort().values), split.select(order[:k].sort().values)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, in float64 chunks to keep memory flat."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        squares += (x * x).sum(1)
    count = images.numel() / c
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _in_memory(name: str, classes: Sequence[str], train_images: torch.Tensor, train_labels: torch.Tensor,
               test_images: torch.Tensor, test_labels: torch.Tensor, val_size: int | float | None, seed: int,
               where: object) -> Dataset:
    mean, std = _channel_stats(train_images)  # the whole training set: independent of the val seed
    full = TensorSplit(train_images, train_labels, mean=mean, std=std)
    train, val = _carve(full, val_size, seed, where)
    test = TensorSplit(test_images, test_labels, mean=mean, std=std)
    return Dataset(name=name, in_channels=train_images.shape[1], num_classes=len(classes),
                   native_resolution=train_images.shape[-1], mean=mean, std=std, train=train, val=val, test=test,
                   classes=tuple(classes))


def _directory(arg: str, name: str, expected: str) -> Path:
    if not arg:
        raise DataError(f"{name} needs a directory: '{name}:DIR' ({expected})")
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: no such directory (expected {expected})")
    return path


# ---- fashion-mnist ---------------------------------------------------------------------------------------
def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzipped or not), checking its magic number and size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    magic = bytes([0, 0, 0x08, ndim])
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != magic:
        raise DataError(f"{path}: not an idx file of {ndim}-d unsigned bytes "
                        f"(expected magic 0x{magic.hex()}, got 0x{data[:4].hex() or 'empty'})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)
    if len(data) - header != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes of data), "
                        f"file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory}: missing {stem}[.gz] (expected the four Fashion-MNIST idx files: "
                    f"{', '.join(s for s, _ in IDX_FILES.values())}, gzipped or not)")


def _load_fashion_mnist(arg: str, val_size: int | float | None, seed: int) -> Dataset:
    expected = "the four Fashion-MNIST idx files, gzipped or not"
    if not arg and not FASHION_MNIST_DIR.is_dir():
        raise DataError(f"{FASHION_MNIST_DIR}: no such directory (install Debian's dataset-fashion-mnist, "
                        f"or pass 'fashion-mnist:DIR' with {expected})")
    directory = _directory(arg, "fashion-mnist", expected) if arg else FASHION_MNIST_DIR
    paths = {key: _find_idx(directory, stem) for key, (stem, _) in IDX_FILES.items()}
    arrays = {key: read_idx(paths[key], ndim) for key, (_, ndim) in IDX_FILES.items()}
    for part in ("train", "test"):
        part_images, part_labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if part_images.shape[0] != part_labels.shape[0]:
            raise DataError(f"{paths[part + '_labels']}: {part_labels.shape[0]} labels for "
                            f"{part_images.shape[0]} images in {paths[part + '_images'].name}")
        if part_labels.size and part_labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{paths[part + '_labels']}: label {part_labels.max()} out of range "
                            f"(expected 0..{len(FASHION_MNIST_CLASSES) - 1})")
    sizes = {arrays[k].shape[1:] for k in ("train_images", "test_images")}
    if len(sizes) != 1 or any(h != w for h, w in sizes):
        raise DataError(f"{directory}: expected square images of one size in both splits, got {sorted(sizes)}")

    def images(key: str) -> torch.Tensor:
        return torch.from_numpy(arrays[key].copy()).unsqueeze(1)

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(arrays[key].astype(np.int64))

    return _in_memory("fashion-mnist", FASHION_MNIST_CLASSES, images("train_images"), labels("train_labels"),
                      images("test_images"), labels("test_labels"), val_size, seed, directory)


# ---- cifar10 -----------------------------------------------------------------------------------------------
def _load_cifar10(arg: str, val_size: int | float | None, seed: int) -> Dataset:
    """CIFAR-10's python batches through torchvision, without its md5 check.

    The md5 check would hash 170 MB on every load and refuses any re-packed or reduced copy; the
    shapes and labels are checked here instead. The batches are pickles: load only trusted files.
    """
    expected = f"CIFAR-10 python batches ({', '.join(CIFAR10_FILES)}) in DIR or DIR/{CIFAR10_FOLDER}"
    directory = _directory(arg, "cifar10", expected)
    folder = directory / CIFAR10_FOLDER
    if not folder.is_dir():
        folder = directory
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if len(missing) == len(CIFAR10_FILES):
        raise DataError(f"{directory}: no CIFAR-10 batches found (expected {expected})")
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)} (expected {expected})")

    from torchvision.datasets import CIFAR10

    class _Unchecked(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

        def __init__(self, train: bool) -> None:
            self.base_folder = folder.name  # the batches folder may have any name
            super().__init__(str(folder.parent), train=train, download=False)

    parts = {}
    for train in (True, False):
        try:
            data = _Unchecked(train)
            images = np.asarray(data.data, dtype=np.uint8)
            labels = np.asarray(data.targets, dtype=np.int64)
            classes = tuple(str(c) for c in data.classes)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
            raise DataError(f"{folder}: not valid CIFAR-10 python batches ({type(exc).__name__}: {exc})") from None
        if images.shape[1:] != (32, 32, 3) or images.shape[0] != labels.shape[0]:
            raise DataError(f"{folder}: expected 32x32x3 images with one label each, got {images.shape} images "
                            f"and {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{folder}: labels must be in 0..{len(classes) - 1} ({len(classes)} classes in "
                            f"batches.meta), got {labels.min()}..{labels.max()}")
        parts[train] = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))
    return _in_memory("cifar10", classes, *parts[True], *parts[False], val_size, seed, folder)


# ---- imagefolder -------------------------------------------------------------------------------------------
def _parse_options(arg: str) -> tuple[str, int, float]:
    path, _, query = arg.partition("?")
    size, crop = IMAGEFOLDER_DEFAULT_SIZE, 1.0
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key == "size":
            try:
                size = int(value)
            except ValueError:
                size = 0
            if size < 1:
                raise DataError(f"imagefolder:{arg}: size must be a positive integer, got '{value}'")
        elif key == "crop":
            try:
                crop = float(value)
            except ValueError:
                crop = 0.0
            if not 0.0 < crop <= 1.0:
                raise DataError(f"imagefolder:{arg}: crop must be a fraction in (0, 1] (ImageNet's is 0.875), "
                                f"got '{value}'")
        else:
            raise DataError(f"imagefolder:{arg}: unknown option '{key}' (known: size, crop)")
    return path, size, crop


def _scan(root: Path, train: tuple[Path, Sequence[str]] | None = None) -> tuple[list[str], list[Path], list[int]]:
    """Class folders of `root` and their images; `train` (the training folder and its classes) fixes the label of
    each name and refuses a class that has no training images."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/*.jpg|png)")
    classes = found if train is None else train[1]
    unknown = sorted(set(found) - set(classes))
    if unknown and train is not None:
        raise DataError(f"{root}: class folder(s) {', '.join(unknown)} not in {train[0]} (its classes: "
                        f"{', '.join(classes)}): a class needs training images; add {train[0] / unknown[0]} "
                        f"or remove {root / unknown[0]}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"{root / name}: no images (expected {', '.join(IMAGE_EXTENSIONS)} files; remove the "
                            "empty class folder or add images)")
        paths += files
        labels += [label] * len(files)
    if train is None and len(classes) < 2:
        raise DataError(f"{root}: one class folder only ('{classes[0]}'): a classifier needs at least two "
                        f"(expected {root}/<class>/*.jpg|png for each class)")
    return list(classes), paths, labels


def _untrained_class(train: Split, classes: Sequence[str], root: Path) -> str:
    """Why a class lost every training image to the held-out splits (a tiny class folder), or ''.

    Training refuses such data (`Dataset.untrained`); a search or an export uses the training split
    only to re-estimate BN statistics, which needs no image of every class.
    """
    counts = torch.bincount(train.labels, minlength=len(classes)).tolist()
    for name, count in zip(classes, counts, strict=True):
        if count == 0:
            return (f"{root / name}: every image of class '{name}' went to the held-out splits, none is left to "
                    "train on (add images to it or pass a smaller --val-size)")
    return ""


def _load_imagefolder(arg: str, val_size: int | float | None, seed: int) -> Dataset:
    """DIR/train/<class>/* and a test split from DIR/test (or DIR/val when there is no DIR/test; or carved from
    DIR/train when there is neither), validation from DIR/val when DIR/test exists, else carved from DIR/train.

    Images are decoded as RGB, resized on the shorter side and centre-cropped to `?size=N`
    (default 224), or, with `?crop=F`, resized to size / F and the centre kept (`crop=0.875`:
    ImageNet's 256 -> 224, at every resolution a batch is asked for), and normalised with
    ImageNet's statistics.
    """
    path, size, crop = _parse_options(arg)
    expected = "DIR/train/<class>/*.jpg|png, optionally DIR/val/<class>/... and DIR/test/<class>/..."
    directory = _directory(path, "imagefolder", expected)
    root = directory / "train"
    if not root.is_dir():
        raise DataError(f"{directory}: no train folder (expected {expected})")
    classes, paths, labels = _scan(root)

    def split(ps: list[Path], ls: list[int]) -> ImageFolderSplit:
        return ImageFolderSplit(ps, torch.tensor(ls, dtype=torch.int64), size=size, crop=crop)

    held_out = [directory / d for d in ("val", "test") if (directory / d).is_dir()]
    train: Split
    val: Split
    note = ""
    if len(held_out) == 2:
        train, val = split(paths, labels), split(*_scan(held_out[0], (root, classes))[1:])
        test: Split = split(*_scan(held_out[1], (root, classes))[1:])
    elif held_out:
        test = split(*_scan(held_out[0], (root, classes))[1:])
        train, val = _carve(split(paths, labels), val_size, seed, root)
        if held_out[0].name == "val":
            note = (f"imagefolder {directory}: no test/ folder: val/ is the test split ({len(test)} images); "
                    f"validation is {len(val)} images held out of train/")
    else:
        k = _val_count(val_size, len(paths), root)
        if len(paths) - 2 * k < 1:
            raise DataError(f"{root}: {len(paths)} images cannot give a test and a validation split of {k} each "
                            f"and keep images to train on (pass a smaller --val-size, add images, or add "
                            f"{directory / 'test'})")
        rest, test = _take(split(paths, labels), k, IMAGEFOLDER_TEST_SEED)
        train, val = _take(rest, k, seed)
        note = (f"imagefolder {directory}: no val/ or test/ folder: the test split is {len(test)} images and "
                f"validation {len(val)} images, both held out of train/ (seeded, disjoint)")
    if note:
        warnings.warn(note, SplitNotice, stacklevel=3)
    return Dataset(name="imagefolder", in_channels=3, num_classes=len(classes), native_resolution=size,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, train=train, val=val, test=test, classes=tuple(classes),
                   val_carved=len(held_out) < 2, untrained=_untrained_class(train, classes, root))


_LOADERS: dict[str, Loader] = {
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "imagefolder": _load_imagefolder,
}


__all__ = ["CIFAR10_FILES", "CIFAR10_FOLDER", "DEFAULT_VAL_FRACTION", "DEFAULT_VAL_SIZE", "FASHION_MNIST_CLASSES",
           "FASHION_MNIST_DIR", "IDX_FILES", "IMAGEFOLDER_DEFAULT_SIZE", "IMAGEFOLDER_TEST_SEED", "IMAGE_EXTENSIONS",
           "Loader", "SplitNotice", "dataset_names", "default_val_count", "load_dataset", "read_idx"]
