"""Datasets: real files load, splits are disjoint and seeded, batches are right and fast, bad files say why."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hwnas.data import FASHION_MNIST_DIR, Dataset, dataset_names, load_dataset
from hwnas.data.readers import SplitNotice
from hwnas.errors import DataError

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                                         reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return load_dataset("fashion-mnist")


# ---- writers of small real files -----------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def unique_images(n: int, size: int, offset: int = 0) -> np.ndarray:
    """Images whose first two pixels spell their index, so each one can be recognised after a split."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    index = np.arange(offset, offset + n)
    images[:, 0, 0], images[:, 0, 1] = index // 256, index % 256
    return images


def write_fashion_dir(root: Path, *, gz: bool, n_train: int = 40, n_test: int = 12, size: int = 28) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": unique_images(n_train, size),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": unique_images(n_test, size, offset=1000),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(root / name, array, gz=gz)
    return arrays


def image_ids(images: torch.Tensor) -> set[int]:
    return set((images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist())


def write_cifar(folder: Path, n_per_batch: int = 6, n_test: int = 8) -> dict[str, dict]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(), "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        batches[name] = entry
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": n_per_batch}))
    return batches


def write_imagefolder(root: Path, splits: tuple[str, ...] = ("train", "test")) -> None:
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split in splits:
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(6 if split == "train" else 2):
                image = Image.new("RGB", (40 + 3 * i, 30), colour)
                suffix = ".png" if i % 2 else ".jpg"
                image.save(root / split / name / f"{i}{suffix}")


# ---- the real Fashion-MNIST ----------------------------------------------------------------------------
def test_real_fashion_mnist_loads(fashion: Dataset) -> None:
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (55000, 5000, 10000)
    assert (fashion.in_channels, fashion.num_classes, fashion.native_resolution) == (1, 10, 28)
    for split in (fashion.train, fashion.val, fashion.test):
        assert split.images.shape[1:] == (1, 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert split.labels.min() == 0 and split.labels.max() == 9
    assert fashion.mean[0] == pytest.approx(0.286, abs=0.002) and fashion.std[0] == pytest.approx(0.353, abs=0.002)
    assert len(fashion.classes) == 10 and fashion.spec == "fashion-mnist"


def test_real_split_is_seeded(fashion: Dataset) -> None:
    again = load_dataset("fashion-mnist", val_size=0.1, seed=0)
    assert len(again.val) == 6000 and len(again.train) == 54000
    other = load_dataset(f"fashion-mnist:{FASHION_MNIST_DIR}", seed=1)
    assert len(other.val) == 5000
    assert not torch.equal(other.val.labels, fashion.val.labels)
    assert torch.equal(other.test.images, fashion.test.images)  # the test split never depends on the seed


@pytest.mark.parametrize("resolution", [24, 28, 32])
def test_batches_shape_and_normalisation(fashion: Dataset, resolution: int) -> None:
    xs, ys = [], []
    for x, y in fashion.val.batches(1000, resolution=resolution):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, resolution, resolution) and x.shape[0] == y.shape[0]
        xs.append(x)
        ys.append(y)
    x = torch.cat(xs)
    assert x.shape[0] == 5000 and torch.equal(torch.cat(ys), fashion.val.labels)
    assert abs(float(x.mean())) < 0.05
    assert 0.85 < float(x.std()) < 1.15


def test_an_epoch_of_augmented_batches_covers_the_training_split(fashion: Dataset) -> None:
    seen = 0
    for x, _ in fashion.train.batches(256, resolution=32, shuffle=True, augment=True, seed=3):
        assert x.shape[1:] == (1, 32, 32)
        seen += x.shape[0]
    assert seen == 55000


# ---- batching on a small known split --------------------------------------------------------------------
@pytest.fixture()
def tiny(tmp_path: Path) -> Dataset:
    write_fashion_dir(tmp_path / "fm", gz=False, n_train=40, n_test=12)
    return load_dataset(f"fashion-mnist:{tmp_path / 'fm'}", val_size=10, seed=0)


def test_splits_are_disjoint_complete_and_reproducible(tmp_path: Path, tiny: Dataset) -> None:
    train, val = image_ids(tiny.train.images), image_ids(tiny.val.images)
    assert len(train) == 30 and len(val) == 10
    assert not train & val and train | val == set(range(40))
    again = load_dataset(f"fashion-mnist:{tmp_path / 'fm'}", val_size=10, seed=0)
    assert image_ids(again.val.images) == val
    other = load_dataset(f"fashion-mnist:{tmp_path / 'fm'}", val_size=10, seed=1)
    assert image_ids(other.val.images) != val
    # the labels travel with their images
    ids = (tiny.train.images[:, 0, 0, 0].long() * 256 + tiny.train.images[:, 0, 0, 1].long())
    assert torch.equal(tiny.train.labels, ids % 10)


def test_shuffle_is_a_seeded_permutation(tiny: Dataset) -> None:
    def labels(**kw: object) -> torch.Tensor:
        return torch.cat([y for _, y in tiny.train.batches(7, **kw)])

    plain = labels()
    assert torch.equal(plain, tiny.train.labels)
    a, b, c = labels(shuffle=True, seed=5), labels(shuffle=True, seed=5), labels(shuffle=True, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, plain.sort().values)


def test_batch_counts(tiny: Dataset) -> None:
    assert [x.shape[0] for x, _ in tiny.train.batches(8)] == [8, 8, 8, 6]
    assert [x.shape[0] for x, _ in tiny.train.batches(8, drop_last=True)] == [8, 8, 8]
    assert [x.shape[0] for x, _ in tiny.train.batches(8, max_batches=2)] == [8, 8]
    assert tiny.train.num_batches(8) == 4 and tiny.train.num_batches(8, drop_last=True) == 3
    assert tiny.train.num_batches(8, max_batches=2) == 2


def test_augment_is_a_padded_crop_or_its_mirror(tiny: Dataset) -> None:
    split = tiny.train
    plain = torch.cat([x for x, _ in split.batches(30)])
    aug = torch.cat([x for x, _ in split.batches(30, augment=True, seed=1)])
    assert aug.shape == plain.shape
    assert not torch.allclose(aug, plain)
    assert torch.equal(aug, torch.cat([x for x, _ in split.batches(30, augment=True, seed=1)]))
    assert not torch.equal(aug, torch.cat([x for x, _ in split.batches(30, augment=True, seed=2)]))
    # each augmented image is one of the (2 * 4 + 1)^2 crops of the zero-padded image, maybe mirrored
    images = split.images.float()
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    raw = aug * (255 * tiny.std[0]) + 255 * tiny.mean[0]
    flipped = 0
    for i in range(len(split)):
        crops = padded[i, 0].unfold(0, 28, 1).unfold(1, 28, 1).reshape(-1, 28, 28)
        crops = torch.cat([crops, crops.flip(-1)])
        match = (crops - raw[i, 0]).abs().amax((1, 2)).argmin()
        assert torch.allclose(crops[match], raw[i, 0], atol=1e-3), f"image {i} is not a crop"
        flipped += int(match >= 81)
    assert 0 < flipped < len(split)


def test_subset_is_a_seeded_sample(tiny: Dataset) -> None:
    sub = tiny.train.subset(12, seed=4)
    assert len(sub) == 12 and image_ids(sub.images) <= image_ids(tiny.train.images)
    assert torch.equal(tiny.train.subset(12, seed=4).images, sub.images)
    assert image_ids(tiny.train.subset(12, seed=5).images) != image_ids(sub.images)
    assert len(tiny.train.subset(1000, seed=0)) == len(tiny.train)
    x, y = next(sub.batches(64, resolution=32))
    assert x.shape == (12, 1, 32, 32) and y.shape == (12,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu(tiny: Dataset) -> None:
    kw = dict(resolution=32, shuffle=True, augment=True, seed=2)
    for (xc, yc), (xg, yg) in zip(tiny.train.batches(8, **kw), tiny.train.batches(8, device="cuda", **kw),
                                  strict=True):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-4)


# ---- fashion-mnist directories ----------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_directory_loads(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion_dir(tmp_path, gz=gz, n_train=20, n_test=7, size=28)
    ds = load_dataset(f"fashion-mnist:{tmp_path}", val_size=0.25, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 7)
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert ds.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    x, _ = next(ds.val.batches(5))
    assert x.shape == (5, 1, 28, 28)


def fm_dir(tmp_path: Path, gz: bool = True) -> Path:
    write_fashion_dir(tmp_path / "fm", gz=gz, n_train=20, n_test=6)
    return tmp_path / "fm"


@pytest.mark.parametrize("stem", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_missing_idx_file_is_named(tmp_path: Path, stem: str) -> None:
    root = fm_dir(tmp_path)
    (root / f"{stem}.gz").unlink()
    with pytest.raises(DataError, match=f"{root}: missing {stem}"):
        load_dataset(f"fashion-mnist:{root}")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: no such directory"):
        load_dataset(f"fashion-mnist:{tmp_path / 'nope'}")


def test_wrong_magic_number(tmp_path: Path) -> None:
    root = fm_dir(tmp_path, gz=False)
    path = root / "train-labels-idx1-ubyte"
    write_idx(path, np.zeros((20, 1), np.uint8), gz=False)  # a 2-d array where labels (1-d) belong
    with pytest.raises(DataError, match=rf"{path}: not an idx file .*magic 0x00000801, got 0x00000802"):
        load_dataset(f"fashion-mnist:{root}")


def test_size_disagreeing_with_header(tmp_path: Path) -> None:
    root = fm_dir(tmp_path, gz=False)
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{path}: header says shape \(6, 28, 28\)"):
        load_dataset(f"fashion-mnist:{root}")


def test_label_count_disagreeing_with_images(tmp_path: Path) -> None:
    root = fm_dir(tmp_path, gz=False)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(19, np.uint8), gz=False)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: 19 labels for 20 images"):
        load_dataset(f"fashion-mnist:{root}")


def test_label_out_of_range(tmp_path: Path) -> None:
    root = fm_dir(tmp_path, gz=False)
    write_idx(root / "t10k-labels-idx1-ubyte", np.full(6, 12, np.uint8), gz=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 12 out of range"):
        load_dataset(f"fashion-mnist:{root}")


@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_broken_gzip(tmp_path: Path, damage: str) -> None:
    root = fm_dir(tmp_path)
    path = root / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"plain text, not gzip")
    with pytest.raises(DataError, match=rf"{path}: truncated or corrupt gzip"):
        load_dataset(f"fashion-mnist:{root}")


def test_unknown_name_and_bad_val_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*known: cifar10, fashion-mnist, imagefolder"):
        load_dataset("mnist")
    assert dataset_names() == ["cifar10", "fashion-mnist", "imagefolder"]
    root = fm_dir(tmp_path)
    with pytest.raises(DataError, match="val_size 20 must be in"):
        load_dataset(f"fashion-mnist:{root}", val_size=20)
    with pytest.raises(DataError, match="val_size as a fraction"):
        load_dataset(f"fashion-mnist:{root}", val_size=1.5)
    with pytest.raises(DataError, match="cifar10 needs a directory"):
        load_dataset("cifar10")


# ---- cifar10 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["parent", "folder"])
def test_cifar10_loads_through_torchvision(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "cifar-10-batches-py" if where == "parent" else tmp_path / "my-cifar"
    batches = write_cifar(folder)
    ds = load_dataset(f"cifar10:{tmp_path if where == 'parent' else folder}", val_size=5, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (25, 5, 8)
    assert (ds.in_channels, ds.num_classes, ds.native_resolution) == (3, 10, 32)
    assert ds.classes[0] == "airplane"
    test = batches["test_batch"]
    assert torch.equal(ds.test.images, torch.from_numpy(test["data"]).view(-1, 3, 32, 32))  # planes R, G, B
    assert ds.test.labels.tolist() == test["labels"]
    assert ds.mean[0] == pytest.approx(127.5 / 255, abs=0.02)
    x, y = next(ds.train.batches(16, resolution=24, augment=True))
    assert x.shape == (16, 3, 24, 24) and y.shape == (16,)


def test_cifar10_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no CIFAR-10 batches found"):
        load_dataset(f"cifar10:{tmp_path / 'empty'}")
    folder = tmp_path / "c" / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=f"{folder}: missing data_batch_3"):
        load_dataset(f"cifar10:{tmp_path / 'c'}")
    (folder / "data_batch_3").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(DataError, match=f"{folder}: not valid CIFAR-10 python batches"):
        load_dataset(f"cifar10:{folder}")


# ---- imagefolder --------------------------------------------------------------------------------------------
def test_imagefolder_loads(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    ds = load_dataset(f"imagefolder:{tmp_path}?size=16", val_size=4, seed=0)
    assert ds.classes == ("cat", "dog") and ds.num_classes == 2 and ds.in_channels == 3
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 4, 4)
    xs, ys = zip(*ds.test.batches(3), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    pixels = x * torch.tensor(ds.std).view(1, 3, 1, 1) + torch.tensor(ds.mean).view(1, 3, 1, 1)
    assert torch.allclose(pixels[0].mean((1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=0.02)  # cat is red
    assert torch.allclose(pixels[3].mean((1, 2)), torch.tensor([0.0, 0.0, 1.0]), atol=0.02)  # dog is blue
    x, _ = next(ds.train.batches(8, resolution=12, augment=True, shuffle=True))
    assert x.shape == (8, 3, 12, 12)


def test_imagefolder_default_size_and_explicit_val(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, splits=("train", "val", "test"))
    ds = load_dataset(f"imagefolder:{tmp_path}", val_size=1)
    assert ds.native_resolution == 224
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 4)  # DIR/val used as given
    assert all(p.parent.parent.name == "val" for p in ds.val.paths)
    x, _ = next(ds.val.batches(2))
    assert x.shape == (2, 3, 224, 224)


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'a'}: no train folder"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}")
    (tmp_path / "a" / "train").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'a' / 'train'}: no class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}")
    write_imagefolder(tmp_path / "b", splits=("train",))
    with pytest.warns(SplitNotice, match=f"imagefolder {tmp_path / 'b'}: no val/ or test/ folder"):
        only_train = load_dataset(f"imagefolder:{tmp_path / 'b'}")  # test and validation carved from train/
    assert (len(only_train.train), len(only_train.val), len(only_train.test)) == (10, 1, 1)
    with pytest.raises(DataError, match="size must be a positive integer"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}?size=big")
    write_imagefolder(tmp_path / "c")
    broken = tmp_path / "c" / "test" / "dog" / "0.jpg"
    broken.write_bytes(b"not a jpeg")
    ds = load_dataset(f"imagefolder:{tmp_path / 'c'}?size=8", val_size=0.25)
    with pytest.raises(DataError, match=f"{broken}: cannot decode image"):
        list(ds.test.batches(2))


def test_imagefolder_crop_is_imagenets_eval_transform_at_every_resolution(tmp_path: Path) -> None:
    """`?crop=0.875`: torchvision's Resize(ceil(r / 0.875)) + CenterCrop(r) + ImageNet normalisation, as Once-for-All
    evaluates, done at the resolution each batch is asked for (not resized from `size`)."""
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i, shape in enumerate([(300, 260), (250, 330)]):  # landscape and portrait
                pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path}?crop=0.875", val_size=1)
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    for r in (224, 160, 176):
        expected_tf = transforms.Compose([transforms.Resize(int(np.ceil(r / 0.875))), transforms.CenterCrop(r),
                                          transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
        x, _ = next(ds.test.batches(4, resolution=r))
        expected = torch.stack([expected_tf(Image.open(p).convert("RGB")) for p in ds.test.paths])
        assert x.shape == (4, 3, r, r)
        assert float((x - expected).abs().max()) < 1e-5
    # crop=1 (the default): the whole shorter side; another view than 0.875's
    whole, _ = next(load_dataset(f"imagefolder:{tmp_path}", val_size=1).test.batches(4, resolution=160))
    cropped, _ = next(ds.test.batches(4, resolution=160))
    assert float((whole - cropped).abs().max()) > 0.1
    for bad in ("0", "1.5", "x"):
        with pytest.raises(DataError, match="crop must be a fraction in"):
            load_dataset(f"imagefolder:{tmp_path}?crop={bad}")
