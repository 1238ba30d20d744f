"""Datasets by name, the train / validation / test splits, and batching fast enough for a 2-core CPU.

`hwnas.data.splits` holds what the rest of hwnas handles (`Dataset` and its `Split`s, which batch
themselves); `hwnas.data.readers` holds the file formats and `load_dataset`, which makes them. The
names of both are importable from `hwnas.data`.
"""

from hwnas.data.readers import (
    CIFAR10_FILES,
    CIFAR10_FOLDER,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IDX_FILES,
    IMAGE_EXTENSIONS,
    IMAGEFOLDER_DEFAULT_SIZE,
    Loader,
    dataset_names,
    load_dataset,
    read_idx,
)
from hwnas.data.splits import (
    DEVICE_CACHE_BYTES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Dataset,
    ImageFolderSplit,
    Split,
    TensorSplit,
)

__all__ = ["CIFAR10_FILES", "CIFAR10_FOLDER", "DEVICE_CACHE_BYTES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR",
           "IDX_FILES", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGEFOLDER_DEFAULT_SIZE", "IMAGE_EXTENSIONS", "Dataset",
           "ImageFolderSplit", "Loader", "Split", "TensorSplit", "dataset_names", "load_dataset", "read_idx"]
