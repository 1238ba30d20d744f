"""An export carries its preprocessing and class names, and the README's ONNX Runtime snippet runs on them as written.

The shipped Fashion-MNIST supernet's smallest arch is exported once (fp32 and int8, BN re-estimated on one
batch, one test batch) through `hwnas export`, from a run record naming the checkpoint by its absolute path
and into an absolute output folder, so the check that deploy.json and the metadata name no absolute path
has something to catch. The snippet is read from README.md (the fenced block after the line
`<!-- snippet: onnx-inference -->`) and executed on real Fashion-MNIST test images written as PNG files; what
it prints must be what the exported file predicts on the same image through hwnas's own batches. An image
folder's record (RGB, both resize rules, JPEG draft decoding) is checked the same way, exactly: a small ONNX
model per image says whether the snippet fed it hwnas's own input for that image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

from exporters.onnx import ort_predict, ort_session
from hwnas.data import FASHION_MNIST_CLASSES, IMAGENET_MEAN, IMAGENET_STD, Dataset, load_dataset
from hwnas.data.preprocessing import preprocessing_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- snippet: onnx-inference -->"
SHIPPED = ROOT / "hwnas" / "checkpoints" / "mbv3-32_fashion-mnist.pt"
SMALLEST = {"space": "mbv3-32", "resolution": 24, "depths": [2, 2, 2, 2], "expands": [3] * 8, "kernels": [3] * 8}


def readme_snippet() -> str:
    """The python block that follows the marker line in README.md."""
    text = README.read_text()
    assert MARKER in text, f"README.md has no line '{MARKER}' before the ONNX Runtime snippet"
    match = re.match(r"\s*```python\n(.*?)```", text.split(MARKER, 1)[1], re.S)
    assert match, f"README.md: the line '{MARKER}' is not followed by a ```python block"
    return match.group(1)


def run_snippet(model: Path, image: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What the README's snippet prints for `python predict.py MODEL IMAGE`."""
    printed = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["predict.py", str(model), str(image)])
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_snippet(), str(README), "exec"), {"__name__": "__main__"})  # noqa: S102 - the README's
    return printed.getvalue().strip()


@pytest.fixture(scope="module")
def fmnist() -> Dataset:
    return load_dataset("fashion-mnist", val_size=5000, seed=0)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fp32 + int8 export of the smallest arch, as `hwnas export --arch best.json` makes it."""
    from hwnas.cli import main
    from hwnas.runrecord import RunRecord

    root = tmp_path_factory.mktemp("snippet")
    record = RunRecord(arch=SMALLEST, space="mbv3-32", supernet=str(SHIPPED), dataset="fashion-mnist",
                       val_size=5000, val_batches=1, batch_size=500, bn_batches=1, bn_batch_size=128)
    best = record.write(root / "results" / "best.json")
    out = root / "exports" / "run1"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", "--arch", str(best), "--precision", "int8", "--calibration", "minmax",
                     "--calibration-images", "32", "--test-batches", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "deploy.json").read_text())
    return {"root": root, "out": out, "report": report, "fp32": out / report["onnx_path"],
            "int8": out / report["int8_onnx_path"]}


def _custom_metadata(path: Path) -> dict[str, str]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_both_files_carry_the_preprocessing_and_class_names(export: dict[str, Any], fmnist: Dataset,
                                                            precision: str) -> None:
    meta = _custom_metadata(export[precision])
    pre, classes = json.loads(meta["hwnas.preprocessing"]), json.loads(meta["hwnas.classes"])
    assert pre == export["report"]["preprocessing"], "the file's record is deploy.json's"
    assert classes == pre["classes"] == list(FASHION_MNIST_CLASSES)
    assert pre["input_shape"] == ["batch", 1, 24, 24] and pre["dtype"] == "float32" and pre["layout"] == "NCHW"
    assert pre["color"] == "L" and pre["channel_order"] == "grayscale" and pre["source_size"] == [28, 28]
    assert pre["resize"] == "resize" and pre["interpolation"] == "bilinear" and pre["antialias"] is True
    assert pre["scale"] == pytest.approx(1 / 255) and pre["mean"] == pytest.approx(list(fmnist.mean))
    assert pre["std"] == pytest.approx(list(fmnist.std)) and len(pre["mean"]) == 1
    session = ort.InferenceSession(str(export[precision]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == pre["input_name"] and session.get_inputs()[0].shape[1:] == [1, 24, 24]
    assert export["report"]["val_size"] == 5000 and meta["hwnas.val_size"] == "5000"


def test_the_record_applied_with_pil_gives_hwnas_s_own_input(export: dict[str, Any], fmnist: Dataset) -> None:
    """The record, applied to the dataset's own images with PIL, reproduces the batches the accuracy was
    measured on, to the one grey level PIL rounds its resized pixels to."""
    pre = export["report"]["preprocessing"]
    _, channels, height, width = pre["input_shape"]
    images = fmnist.test.images[:64]
    ours = np.stack([_apply(pre, Image.fromarray(im[0].numpy(), "L")) for im in images])
    x, _ = next(iter(fmnist.test.batches(64, resolution=height)))
    grey_level = pre["scale"] / min(pre["std"])
    assert ours.shape == tuple(x.shape) == (64, channels, height, width)
    assert np.abs(ours - x.numpy()).max() <= grey_level + 1e-5
    assert np.abs(ours - x.numpy()).mean() < grey_level / 4


def _apply(pre: dict[str, Any], image: Image.Image) -> np.ndarray:
    _, channels, height, width = pre["input_shape"]
    fitted = ImageOps.fit(image.convert(pre["color"]), (width, height), Image.Resampling.BILINEAR)
    x = np.asarray(fitted, np.float32).reshape(height, width, channels) * pre["scale"]
    return ((x - pre["mean"]) / pre["std"]).transpose(2, 0, 1).astype(np.float32)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_readme_snippet_prints_the_class_the_export_predicts(export: dict[str, Any], fmnist: Dataset,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 precision: str) -> None:
    assert len(readme_snippet().strip().splitlines()) <= 25
    model = export[precision]
    count = 8
    x, labels = next(iter(fmnist.test.batches(count, resolution=24)))
    predicted = ort_predict(ort_session(model), x.numpy(), count).argmax(1)  # hwnas's own preprocessing
    for i in range(count):
        png = tmp_path / f"test{i}.png"
        Image.fromarray(fmnist.test.images[i, 0].numpy(), "L").save(png)  # the real 28x28 test image
        printed = run_snippet(model, png, monkeypatch)
        assert printed == FASHION_MNIST_CLASSES[int(predicted[i])], (i, printed)
    correct = int((predicted == labels.numpy()).sum())
    assert correct >= count // 2, "the model gets most of these right, so the snippet printed true classes"


def test_deploy_json_and_the_metadata_name_no_absolute_path(export: dict[str, Any]) -> None:
    """The record named the checkpoint absolutely and the output folder is absolute: what the export wrote names
    every file relative to the export folder, and each name leads back to its file from there."""
    report, out = export["report"], export["out"]
    metas = [_custom_metadata(export[precision]) for precision in ("fp32", "int8")]
    texts = _strings(report) + [v for meta in metas for v in meta.values()]
    for text in texts:
        assert not Path(text).is_absolute() and not text.startswith(("/", "\\")), text
        assert str(export["root"]) not in text, text
    for key in ("onnx_path", "int8_onnx_path"):
        assert report[key] == export["fp32" if key == "onnx_path" else "int8"].name, "beside deploy.json, by name"
    for meta in metas:
        assert (out / meta["hwnas.source"]).resolve() == SHIPPED.resolve(), meta["hwnas.source"]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# ---- an image folder: RGB files of odd shapes, PNG and JPEG, both resize rules ------------------------------------
SHAPES = [(40, 30), (25, 50), (64, 64), (33, 47)]
RESOLUTION = 20  # another size than the folder's ?size=24: hwnas decodes at the resolution asked for


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/train and DIR/test with classes cat and dog: smooth RGB images of several shapes, half of them JPEG
    (the 64 px one is big enough for Pillow's draft mode to decode it at half size)."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for name in ("cat", "dog"):
            (root / part / name).mkdir(parents=True)
            for i, (w, h) in enumerate(SHAPES):
                yy, xx = np.mgrid[0:h, 0:w]
                phase = rng.uniform(0, 6, size=3)
                pixels = np.stack([127 + 120 * np.sin(xx / (5 + c) + yy / 7 + phase[c]) for c in range(3)], axis=-1)
                suffix = ".jpg" if i % 2 == 0 else ".png"
                Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / part / name / f"{i}{suffix}")
    return root


def _matching_model(path: Path, pre: dict[str, Any], reference: np.ndarray, tolerance: float = 1e-6) -> Path:
    """An ONNX model carrying `pre` as an export does, whose two classes say whether its input is `reference`
    ("same": the sum of squared differences is under `tolerance`; one grey level off anywhere is 3e-4 over it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _, c, h, w = pre["input_shape"]
    constants = [numpy_helper.from_array(reference[None].astype(np.float32), "reference"),
                 numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
                 numpy_helper.from_array(np.array([[tolerance]], np.float32), "tolerance")]
    nodes = [helper.make_node("Sub", ["input", "reference"], ["d"]), helper.make_node("Mul", ["d", "d"], ["d2"]),
             helper.make_node("ReduceSum", ["d2", "axes"], ["sum4"], keepdims=1),
             helper.make_node("Flatten", ["sum4"], ["sum"]), helper.make_node("Sub", ["tolerance", "sum"], ["same"]),
             helper.make_node("Sub", ["sum", "sum"], ["zero"]),
             helper.make_node("Concat", ["same", "zero"], ["logits"], axis=1)]
    graph = helper.make_graph(nodes, "matches", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               ["batch", c, h, w])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (("hwnas.preprocessing", json.dumps(pre)), ("hwnas.classes", json.dumps(pre["classes"]))):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("crop", "resize"), [(1.0, "fit"), (0.875, "shorter_side_then_center_crop")])
def test_an_image_folder_s_record_run_by_the_snippet_is_hwnas_s_input_exactly(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crop: float, resize: str) -> None:
    dataset = load_dataset(f"imagefolder:{folder}?size=24&crop={crop}", val_size=2, seed=0)
    record = preprocessing_for(dataset, RESOLUTION)
    assert record is not None
    pre = record.to_dict()
    assert pre["resize"] == resize and pre["color"] == "RGB" and pre["channel_order"] == "RGB" and pre["jpeg_draft"]
    assert pre["input_shape"] == ["batch", 3, RESOLUTION, RESOLUTION] and pre["classes"] == ["cat", "dog"]
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN) and pre["std"] == pytest.approx(IMAGENET_STD)
    assert pre["shorter_side"] == (RESOLUTION if crop == 1.0 else math.ceil(RESOLUTION / crop))
    pre = {**pre, "classes": ["same", "different"]}
    x, _ = next(iter(dataset.test.batches(len(dataset.test), resolution=RESOLUTION)))  # what hwnas feeds the net
    for i, path in enumerate(dataset.test.paths):  # type: ignore[attr-defined]
        model = _matching_model(tmp_path / f"matches{i}.onnx", pre, x[i].numpy())
        assert run_snippet(model, path, monkeypatch) == "same", path
        other = _matching_model(tmp_path / f"other{i}.onnx", pre, x[i].numpy() + pre["scale"] / pre["std"][0])
        assert run_snippet(other, path, monkeypatch) == "different", "one grey level off is told apart"


def test_a_split_of_unknown_kind_gets_no_record_rather_than_a_wrong_one(fmnist: Dataset) -> None:
    import torch

    from hwnas.data.splits import Split

    class Other(Split):
        def select(self, index: Any) -> Split:
            return self

        def _fetch(self, chunks: Any, device: Any) -> Any:
            yield from ()

    assert preprocessing_for(fmnist, 28) is not None
    other = Other(torch.zeros(1, dtype=torch.int64), native_resolution=28, mean=(0.5,), std=(0.5,))
    assert preprocessing_for(dataclasses.replace(fmnist, test=other), 28) is None
