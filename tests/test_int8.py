"""int8 on the CPU with real ONNX Runtime sessions: the quantized file (QDQ nodes, integer kernels, outputs close
to fp32's), its metadata and deploy.json, accuracy measured in ONNX Runtime beside fp32's, one-line errors for what
cannot be quantized and for bad CLI input, and the int8 latency profile (its fingerprint records the quantization
settings; an fp32 table is refused for it; the search runs under an int8 table).

Calibration here is on 64 images and accuracy is counted on 500 images, to keep the file fast: what is
checked (the graph, the metadata, the comparison with fp32) does not depend on how well the scales are chosen.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters.onnx import export_onnx, read_arch, read_metadata
from exporters.onnx_int8 import DEFAULT_SETTINGS, Int8Settings, is_quantized, quantize_onnx
from hwnas.checkpoint import load_supernet
from hwnas.data import Dataset, load_dataset
from hwnas.demo import shipped_supernet
from hwnas.deploy import EvalSettings, deploy, int8_calibration, ort_accuracy, summary_table
from hwnas.errors import ExportError, HwnasError, LatencyTableError
from hwnas.evaluation import recalibrated_subnet
from hwnas.latency.backends import Timing
from hwnas.latency.profiles import load_profile
from hwnas.latency.table import LatencyTable, meta_path_for
from hwnas.supernet import Supernet

SHIPPED = shipped_supernet()
SETTINGS = EvalSettings(bn_batches=2, bn_batch_size=128, seed=3, batch_size=500, val_batches=1)
# the shipped settings (types, per-channel, reduce_range, calibration method) on fewer images
FAST = replace(DEFAULT_SETTINGS, calibration_images=64, calibration_batch=32)

# fast timing settings (the numbers are noisy; what is checked is which file is timed and how it is recorded)
FAST_PROFILE = """\
name = "test-ort-{precision}"
backend = "onnxruntime-cpu"
precision = "{precision}"
batch_size = 1
threads = 1
warmup = 1
repeats = 5
statistic = "median"
description = "fast settings for tests"
"""


@pytest.fixture(scope="module")
def shipped() -> Supernet:
    supernet, _ = load_supernet(SHIPPED, space_name="mbv3-32")
    return supernet.eval()


@pytest.fixture(scope="module")
def fmnist() -> Dataset:
    return load_dataset("fashion-mnist", val_size=5000, seed=0)


@pytest.fixture(scope="module")
def fp32_file(shipped: Supernet, fmnist: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest arch, BN re-estimated, exported to fp32 ONNX (checked against torch by export_onnx)."""
    arch = shipped.space.smallest()
    module = recalibrated_subnet(shipped, arch, fmnist.train, SETTINGS)
    out = tmp_path_factory.mktemp("int8") / "smallest.onnx"
    return export_onnx(module, arch, out, input_shape=shipped.space.input_shape(arch)).path


@pytest.fixture(scope="module")
def val_images(shipped: Supernet, fmnist: Dataset) -> np.ndarray:
    x, _ = next(iter(fmnist.val.batches(500, resolution=shipped.space.smallest().resolution)))
    return x.numpy()


@pytest.fixture(scope="module")
def int8_file(fp32_file: Path, fmnist: Dataset, val_images: np.ndarray, shipped: Supernet):  # noqa: ANN201
    images = int8_calibration(fmnist.train, shipped.space.smallest().resolution, FAST, seed=0)
    return quantize_onnx(fp32_file, fp32_file.with_suffix(".int8.onnx"), images, FAST, check_inputs=val_images,
                         metadata={"calibration_split": "train"})


def _profile(tmp_path: Path, precision: str) -> Path:
    path = tmp_path / f"test-ort-{precision}.toml"
    path.write_text(FAST_PROFILE.format(precision=precision))
    return path


def _logits(path: Path, x: np.ndarray, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            optimized: Path | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---- the quantized file ----------------------------------------------------------------------------------------
def test_quantized_file_holds_qdq_runs_integer_kernels_and_stays_close_to_fp32(fp32_file: Path, int8_file,
                                                                             val_images: np.ndarray,
                                                                             tmp_path: Path) -> None:
    path = int8_file.path
    assert path.is_file() and is_quantized(path) and not is_quantized(fp32_file)
    nodes = onnx.load(str(path)).graph.node
    ops = {n.op_type for n in nodes}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8_file.qdq_nodes == sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes)
    assert int8_file.quantized_ops.get("Conv", 0) >= 10 and "Gemm" in int8_file.quantized_ops
    weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 10, "the conv weights are stored as int8"
    # the CPU provider fuses the QDQ pairs into integer kernels when it builds the session
    optimized = tmp_path / "optimized.onnx"
    int8 = _logits(path, val_images, optimized=optimized)
    fused = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert fused & {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"}, sorted(fused)
    fp32 = _logits(fp32_file, val_images)
    assert np.all(np.isfinite(int8)) and int8.shape == fp32.shape
    agreement = float(np.mean(int8.argmax(1) == fp32.argmax(1)))
    diff = float(np.max(np.abs(int8 - fp32)))
    assert agreement >= 0.9, f"int8 and fp32 agree on {100 * agreement:.1f} % of 500 validation images"
    relative = float(np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32))
    print(f"max abs diff {diff:.3f}, relative error {relative:.4f}")
    assert diff > 0, "the int8 model is not the fp32 one"
    assert relative < 0.15, f"int8 logits are {100 * relative:.1f} % off fp32's (relative to their norm)"
    assert int8_file.agreement == pytest.approx(agreement, abs=0.02)
    assert int8_file.max_abs_diff == pytest.approx(diff, rel=0.5)


def test_quantization_settings_and_the_source_arch_are_in_the_metadata(fp32_file: Path, int8_file) -> None:
    meta = read_metadata(int8_file.path)
    assert meta["hwnas.precision"] == "int8" and meta["hwnas.quantized_from"] == fp32_file.name
    assert meta["hwnas.calibration_method"] == FAST.method and meta["hwnas.calibration_images"] == "64"
    assert int8_file.calibration_images == 64
    assert meta["hwnas.calibration_batch"] == "32" and meta["hwnas.calibration_split"] == "train"
    assert meta["hwnas.activation_type"] == "int8" and meta["hwnas.weight_type"] == "int8"
    assert meta["hwnas.per_channel"] == "true" and meta["hwnas.reduce_range"] == str(FAST.reduce_range).lower()
    assert "quantize_static" in meta["hwnas.quantization"]
    assert float(meta["hwnas.int8_agreement"]) == pytest.approx(int8_file.agreement, abs=1e-5)
    assert read_arch(int8_file.path) == read_arch(fp32_file)  # the fp32 file's metadata is kept


def test_calibration_images_are_counted_as_fed(fp32_file: Path, tmp_path: Path) -> None:
    """Fewer images than asked: the metadata records how many were fed, not the setting."""
    rng = np.random.default_rng(0)
    few = [rng.standard_normal((10, *onnx_input_shape(fp32_file))).astype(np.float32)]
    result = quantize_onnx(fp32_file, tmp_path / "few.onnx", few, FAST)
    assert result.calibration_images == 10 and read_metadata(result.path)["hwnas.calibration_images"] == "10"


def onnx_input_shape(path: Path) -> tuple[int, ...]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])


@pytest.mark.parametrize("case", ["corrupt", "text", "missing", "no_images", "wrong_shape", "nan_images"])
def test_what_cannot_be_quantized_is_one_line_and_leaves_no_file(case: str, fp32_file: Path, tmp_path: Path) -> None:
    shape = onnx_input_shape(fp32_file)
    good = [np.zeros((8, *shape), np.float32)]
    source, images = fp32_file, good
    if case == "corrupt":
        source = tmp_path / "corrupt.onnx"
        source.write_bytes(fp32_file.read_bytes()[: len(fp32_file.read_bytes()) // 3])
    elif case == "text":
        source = tmp_path / "model.onnx"
        source.write_text("this is not an ONNX model\n")
    elif case == "missing":
        source = tmp_path / "absent.onnx"
    elif case == "no_images":
        images = []
    elif case == "wrong_shape":
        images = [np.zeros((8, 3, 40, 40), np.float32)]
    elif case == "nan_images":
        images = [np.full((8, *shape), np.nan, np.float32)]
    target = tmp_path / "out.int8.onnx"
    with pytest.raises(ExportError) as info:
        quantize_onnx(source, target, images, FAST)
    message = str(info.value)
    assert "\n" not in message and str(source) in message
    expected = {"corrupt": "not a readable ONNX file", "text": "not a readable ONNX file",
                "missing": "no such ONNX file",
                "no_images": "no calibration images", "wrong_shape": "the model takes",
                "nan_images": "finite"}[case]
    assert expected in message, message
    assert not target.exists() and not list(tmp_path.glob("*.tmp*")), sorted(tmp_path.iterdir())


def test_bad_settings_are_refused_naming_the_setting() -> None:
    with pytest.raises(ExportError, match="calibration images must be an integer >= 1"):
        DEFAULT_SETTINGS.with_calibration(images=0)
    with pytest.raises(ExportError, match="calibration method must be one of"):
        DEFAULT_SETTINGS.with_calibration(method="kl")
    with pytest.raises(ExportError, match="percentile"):
        Int8Settings(percentile=20.0).check()


# ---- the export: accuracy beside fp32, deploy.json, the summary ------------------------------------------------
def test_int8_export_measures_accuracy_in_onnx_runtime_beside_fp32_and_records_the_calibration(
        shipped: Supernet, fmnist: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hwnas.latency.artifact as artifact
    from hwnas.latency.quiet import QuietGuard

    # 3 rounds back to back instead of 16 spread over 8 s: real timings, a shorter schedule
    monkeypatch.setattr(artifact, "measure_artifact", functools.partial(artifact.measure_artifact, rounds=3, gap_s=0))
    arch = shipped.space.smallest()
    profile = load_profile(_profile(tmp_path, "int8"))
    lines: list[str] = []
    report = deploy(shipped, arch, tmp_path / "out", dataset=fmnist, settings=SETTINGS, profile=profile,
                    budget_ms=100.0, test_batches=1, precision="int8", int8=FAST, log=lines.append,
                    guard=QuietGuard(policy="ignore", max_wait_s=0, log=lines.append))
    assert report.precision == "int8" and report.shipped_path == report.int8_onnx_path
    int8_path = Path(report.int8_onnx_path or "")
    assert int8_path.is_file() and is_quantized(int8_path) and not is_quantized(report.onnx_path)
    # accuracy of each file, measured again here in ONNX Runtime on the same 500 test images
    fp32_acc = ort_accuracy(report.onnx_path, fmnist.test, arch.resolution, max_batches=1)
    int8_acc = ort_accuracy(int8_path, fmnist.test, arch.resolution, max_batches=1)
    assert report.test_accuracy_ort == pytest.approx(fp32_acc) and report.test_accuracy_int8 == pytest.approx(int8_acc)
    assert int8_acc > 50, "the int8 model still classifies (chance is 10 %)"
    assert report.int8_agreement is not None and report.int8_agreement >= 0.85
    # both files timed on the int8 profile: the shipped one is the int8 file
    assert report.measured_ms and report.fp32_measured_ms and report.speedup == pytest.approx(
        report.fp32_measured_ms / report.measured_ms)
    meta = read_metadata(int8_path)
    assert float(meta["hwnas.test_accuracy_ort"]) == pytest.approx(int8_acc, abs=1e-3)
    assert float(meta["hwnas.test_accuracy_ort_fp32"]) == pytest.approx(fp32_acc, abs=1e-3)
    assert float(meta["hwnas.measured_latency_ms"]) == pytest.approx(report.measured_ms, rel=1e-4)
    assert meta["hwnas.calibration_seed"] == "3" and meta["hwnas.calibration_dataset"]
    assert meta["hwnas.profile"] == profile.name
    saved = json.loads((tmp_path / "out" / "deploy.json").read_text())
    assert saved["precision"] == "int8" and saved["int8_onnx_path"] == int8_path.name  # beside deploy.json
    quant = saved["quantization"]
    assert quant["method"] == FAST.method and quant["calibration_images"] == 64 and quant["calibration_seed"] == 3
    assert quant["calibration_split"] == "train" and quant["graph"] == FAST.graph_settings()
    assert saved["test_accuracy_int8"] == pytest.approx(int8_acc)
    assert saved["test_accuracy_ort"] == pytest.approx(fp32_acc)
    table = summary_table([report])
    assert "test acc int8" in table and "fp32 ms" in table and "speed-up" in table
    assert f"{int8_acc:.2f}%" in table and f"{fp32_acc:.2f}%" in table and str(int8_path) in table
    assert any("int8 " in line and "fp32 " in line and "points" in line for line in lines), lines


def test_an_fp32_profile_is_refused_for_an_int8_export_and_back(shipped: Supernet, fmnist: Dataset,
                                                                tmp_path: Path) -> None:
    arch = shipped.space.smallest()
    for precision, profile_precision in (("int8", "fp32"), ("fp32", "int8")):
        with pytest.raises(HwnasError, match=f"times {profile_precision} ONNX models, this export ships {precision}"):
            deploy(shipped, arch, tmp_path / precision, dataset=fmnist, settings=SETTINGS, precision=precision,
                   profile=load_profile(_profile(tmp_path, profile_precision)), log=lambda *_: None)
        assert not (tmp_path / precision).exists()


# ---- the CLI: bad input is one line, nothing written -------------------------------------------------------------
SMALLEST = ('{"space": "mbv3-32", "resolution": 24, "depths": [2, 2, 2, 2], "expands": [3, 3, 3, 3, 3, 3, 3, 3], '
            '"kernels": [3, 3, 3, 3, 3, 3, 3, 3]}')


@pytest.mark.parametrize(("extra", "expected"), [
    (["--precision", "int8", "--calibration-images", "0"], "calibration images must be an integer >= 1, got 0"),
    (["--precision", "int8", "--calibration-images", "-5"], "calibration images must be an integer >= 1, got -5"),
    (["--precision", "int8", "--data", "none"], "calibrated on training images"),
    (["--calibration", "minmax"], "give --precision int8 with --format onnx"),
    (["--format", "tensorrt", "--precision", "int8", "--calibration-images", "64"], "TensorRT calibrates its own"),
    (["--precision", "fp16"], "--format onnx ships --precision fp32, int8, not 'fp16'"),
    (["--precision", "int8", "--profile", "cpu-onnxruntime"], "give --profile cpu-onnxruntime-int8"),
    (["--precision", "fp32", "--profile", "cpu-onnxruntime-int8"], "give --profile cpu-onnxruntime "),
])
def test_bad_int8_cli_input_is_one_line_and_writes_nothing(extra: list[str], expected: str, hwnas_cli,  # noqa: ANN001
                                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = hwnas_cli("export", "--supernet", str(SHIPPED), "--arch", SMALLEST, "--out", str(out), *extra)
    assert result.returncode == 2
    assert expected in _one_line(result.stderr) + " ", result.stderr
    assert not out.exists()


def test_int8_cli_export_prints_both_accuracies(hwnas_cli, tmp_path: Path) -> None:  # noqa: ANN001
    from hwnas.runrecord import RunRecord

    # a run record that scores as cheaply as a search with one BN batch and one validation batch would
    record = RunRecord(arch=json.loads(SMALLEST), space="mbv3-32", supernet=str(SHIPPED), dataset="fashion-mnist",
                       val_size=5000, val_batches=1, batch_size=500, bn_batches=1, bn_batch_size=128)
    best = record.write(tmp_path / "best.json")
    out = tmp_path / "out"
    result = hwnas_cli("export", "--arch", str(best), "--precision", "int8", "--calibration", "minmax",
                       "--calibration-images", "32", "--test-batches", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "deploy.json").read_text())
    assert saved["quantization"]["method"] == "minmax" and saved["quantization"]["calibration_images"] == 32
    assert f"int8 {saved['test_accuracy_int8']:.2f} %, fp32 {saved['test_accuracy_ort']:.2f} %" in result.stdout
    assert saved["int8_onnx_path"] in result.stdout and "minmax on 32 images" in result.stdout
    assert read_metadata(out / saved["int8_onnx_path"])["hwnas.calibration_images"] == "32"


# ---- the int8 latency profile ---------------------------------------------------------------------------------
def test_int8_profile_times_quantized_blocks_and_its_fingerprint_records_the_settings(tmp_path: Path) -> None:
    from hwnas.latency.backends import OnnxRuntimeCpuBackend
    from hwnas.latency.device import fingerprint
    from hwnas.latency.profiler import profile_space
    from hwnas.space import SearchSpace, StageSpec

    # one stage, two kernel sizes: 8 blocks, each exported and quantized as the int8 profile does
    space = SearchSpace(name="tiny-int8", in_channels=1, num_classes=4, stem_channels=8, stem_stride=2,
                        stem_act="hswish", first_channels=8, stages=(StageSpec(16, stride=2, act="hswish", se=True),),
                        final_expand_channels=32, feature_channels=48, head_act="hswish", kernel_choices=(3, 5),
                        expand_choices=(2,), depth_choices=(1, 2), resolution_choices=(12,))
    int8_profile, fp32_profile = load_profile(_profile(tmp_path, "int8")), load_profile(_profile(tmp_path, "fp32"))
    int8_path = profile_space(space, int8_profile, tmp_path / "tables", calibration_subnets=0, rounds=1,
                              progress=False)
    meta = json.loads(meta_path_for(int8_path).read_text())
    assert meta["profile"]["precision"] == "int8"
    assert meta["fingerprint"]["runtime"]["quantization"] == DEFAULT_SETTINGS.graph_settings()
    table = LatencyTable.load(int8_path)
    assert table.missing_keys(space) == [] and all(table.block_cost(s) > 0 for s in space.all_blocks())
    assert table.check_target(space, int8_profile, fingerprint(int8_profile)) == []

    # the backend's session for a block is the quantized model (its metadata says so)
    from hwnas.blocks import build_network

    spec = space.all_blocks()[0]
    module = build_network([spec]).eval()
    shape = (spec.cin, spec.in_size, spec.in_size)
    meta_of = {p.precision: OnnxRuntimeCpuBackend(p).session(module, shape).get_modelmeta().custom_metadata_map
               for p in (int8_profile, fp32_profile)}
    assert meta_of["int8"]["hwnas.precision"] == "int8" and "hwnas.precision" not in meta_of["fp32"]

    # an fp32 table is refused for the int8 profile, naming the precision
    fp32_path = profile_space(space, fp32_profile, tmp_path / "tables", calibration_subnets=0, rounds=1,
                              progress=False)
    assert fp32_path != int8_path
    with pytest.raises(LatencyTableError, match="precision"):
        LatencyTable.load(fp32_path).check_target(space, int8_profile, fingerprint(int8_profile))
    # and an int8 table quantized with other graph settings is refused too, naming the setting
    other = dict(meta, fingerprint=dict(meta["fingerprint"], runtime=dict(
        meta["fingerprint"]["runtime"], quantization=dict(DEFAULT_SETTINGS.graph_settings(),
                                                          reduce_range=not DEFAULT_SETTINGS.reduce_range))))
    meta_path_for(int8_path).write_text(json.dumps(other))
    with pytest.raises(LatencyTableError, match="reduce_range"):
        LatencyTable.load(int8_path).check_target(space, int8_profile, fingerprint(int8_profile))


def test_search_runs_under_an_int8_table(shipped: Supernet, hwnas_cli, tmp_path: Path) -> None:  # noqa: ANN001
    """The search reads a table and does not care about its precision: an int8 one (here with synthetic
    numbers, this machine's int8 fingerprint) gives a run record that names it and meets its budget."""
    from test_search_cli import small_fashion_mnist

    from hwnas.latency.device import device_slug, fingerprint

    space = shipped.space
    profile = load_profile("cpu-onnxruntime-int8")
    fp = fingerprint(profile)
    table = LatencyTable.new(space, profile=profile, fingerprint=fp, device_slug=device_slug(fp))
    for spec in space.all_blocks():
        t = 0.01 + spec.in_size**2 * (spec.cin + spec.cout) * (spec.kernel**2 + spec.hidden) * 1e-7
        table.record(spec, Timing(median_ms=t, p10_ms=0.9 * t, p90_ms=1.1 * t, mean_ms=t, n=5))
    path = table.save(tmp_path / "mbv3-32" / f"{device_slug(fp)}__cpu-onnxruntime-int8.csv")
    low, high = table.latency_range(space)
    budget = low + 0.3 * (high - low)
    out = tmp_path / "search"
    data = small_fashion_mnist(tmp_path / "fmnist", n_train=600, n_test=100)
    result = hwnas_cli("search", "--supernet", str(SHIPPED), "--table", str(path), "--budget-ms", f"{budget}",
                       "--out", str(out), "--strategy", "random", "--queries", "2", "--data", f"fashion-mnist:{data}",
                       "--val-size", "200",
                       "--val-batches", "1", "--batch-size", "50", "--bn-batches", "1", "--bn-batch-size", "16",
                       "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    best = json.loads((out / "best.json").read_text())
    assert best["table"].endswith("__cpu-onnxruntime-int8.csv") and best["predicted_latency_ms"] <= budget
