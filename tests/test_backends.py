"""Timing backends on real runtimes: ONNX Runtime and eager torch on the CPU; CUDA and TensorRT where present."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hwnas import spaces
from hwnas.blocks import build_block, build_network
from hwnas.errors import ExportError, HwnasError, ProfileError
from hwnas.latency.artifact import artifact_timer
from hwnas.latency.backends import CudaGraphRunner, Timing, get_backend
from hwnas.latency.profiles import DeviceProfile, load_profile

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")


def _tensorrt_present() -> bool:
    # The tensorrt type stubs import as an empty namespace package; only the real wheel has __version__.
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import tensorrt

    return hasattr(tensorrt, "__version__")


def tiny(backend: str, precision: str = "fp32", batch_size: int = 1, **kw: object) -> DeviceProfile:
    """Few repeats: these tests check what a backend returns, not how fast anything is."""
    return DeviceProfile(f"test-{backend}", backend, precision, batch_size=batch_size, threads=1, warmup=2,
                         repeats=7, **kw)  # type: ignore[arg-type]


def small_block() -> tuple[nn.Module, tuple[int, int, int]]:
    space = spaces.get("mbv3-32")
    spec = next(s for s in space.all_blocks() if s.kind == "mbconv" and s.se and s.stride == 1)
    return build_block(spec, space.se_ratio), (spec.cin, spec.in_size, spec.in_size)


def small_network() -> tuple[nn.Module, tuple[int, int, int]]:
    space = spaces.get("mbv3-32")
    arch = space.smallest()
    return build_network(space.blocks(arch), space.se_ratio), space.input_shape(arch)


def assert_sane(timing: Timing, repeats: int) -> None:
    assert timing.n == repeats
    assert 0 < timing.min_ms <= timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert timing.min_ms <= timing.mean_ms and math.isfinite(timing.mean_ms)


# ---- Timing -----------------------------------------------------------------------------------------------
def test_timing_percentiles_on_known_samples() -> None:
    t = Timing.from_samples([float(v) for v in range(1, 12)])  # 1..11
    assert (t.median_ms, t.p10_ms, t.p90_ms, t.mean_ms, t.min_ms, t.n) == (6.0, 2.0, 10.0, 6.0, 1.0, 11)
    # Linear interpolation between order statistics; the outlier moves the mean, not the median.
    t = Timing.from_samples([4.0, 1.0, 3.0, 2.0, 100.0])
    assert t.median_ms == 3.0 and t.p10_ms == pytest.approx(1.4) and t.p90_ms == pytest.approx(61.6)
    assert t.mean_ms == pytest.approx(22.0)
    assert t.value("median") == 3.0 and t.value("mean") == pytest.approx(22.0) and t.value("min") == 1.0


def test_timing_refuses_bad_samples_and_statistics() -> None:
    for bad in ([], [1.0, float("nan")], [-1.0, 2.0]):
        with pytest.raises(ValueError):
            Timing.from_samples(bad)
    with pytest.raises(ValueError, match="unknown statistic"):
        Timing.from_samples([1.0]).value("p99")
    summary = Timing(median_ms=1.0, p10_ms=0.9, p90_ms=1.2, mean_ms=1.05, n=5)  # as the profiler combines rounds
    assert summary.value("median") == 1.0
    with pytest.raises(ValueError, match="no minimum"):
        summary.value("min")


# ---- CPU backends -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "torch-cpu"])
def test_cpu_backend_times_a_real_block_and_network(backend: str) -> None:
    profile = tiny(backend)
    runner = get_backend(profile)
    assert runner.name == backend
    block, block_shape = small_block()
    net, net_shape = small_network()
    block.train()  # the caller's flags are the caller's: timing runs an eval copy and leaves them be
    t_block = runner.time_module(block, block_shape)
    t_net = runner.time_module(net, net_shape)
    assert_sane(t_block, profile.repeats)
    assert_sane(t_net, profile.repeats)
    assert block.training and not any(p.is_cuda for p in block.parameters())
    again = runner.time_module(block, block_shape)  # a second round of the same module
    assert_sane(again, profile.repeats)


def test_batch_size_comes_from_the_profile() -> None:
    net, shape = small_network()
    profile = tiny("onnxruntime-cpu", batch_size=3)
    session = get_backend(profile).session(net, shape)  # type: ignore[attr-defined]
    assert session.get_inputs()[0].shape == [3, *shape]
    assert_sane(get_backend(profile).time_module(net, shape), profile.repeats)


def test_onnxruntime_session_threads_are_the_profiles() -> None:
    block, shape = small_block()
    backend = get_backend(DeviceProfile("t2", "onnxruntime-cpu", "fp32", 1, threads=2, warmup=1, repeats=5))
    options = backend.session(block, shape).get_session_options()  # type: ignore[attr-defined]
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1


def test_torch_cpu_restores_the_thread_count() -> None:
    block, shape = small_block()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        get_backend(tiny("torch-cpu")).time_module(block, shape)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_get_backend_accepts_a_profile_name() -> None:
    assert get_backend("cpu-torch").name == "torch-cpu"


def test_get_backend_refuses_a_device_the_profile_does_not_expect() -> None:
    profile = tiny("torch-cpu", expect={"cpu_model": "Imaginary CPU 9000"})
    with pytest.raises(ProfileError, match=r"field 'expect.cpu_model': expects 'Imaginary CPU 9000'"):
        get_backend(profile)


# ---- shipped artifacts ------------------------------------------------------------------------------------------
def test_artifact_timer_times_the_onnx_file_in_a_new_onnx_runtime_session_each_round(tmp_path: Path) -> None:
    from exporters.onnx import export_module

    net, shape = small_network()
    profile = tiny("onnxruntime-cpu", batch_size=2)
    path = export_module(net, tmp_path / "subnet.onnx", shape, batch_size=2, dynamic_batch=False)
    once, artifact = artifact_timer(profile, module=net, onnx_path=path, engine_path=None, input_shape=shape)
    assert artifact == str(path)
    assert_sane(once(), profile.repeats)  # a fixed batch of 2: the feed has the profile's batch
    assert_sane(once(), profile.repeats)
    path.unlink()
    with pytest.raises(ExportError, match="no such ONNX file"):  # the file is timed, not the module
        once()


def test_artifact_timer_times_the_module_for_torch_and_needs_an_engine_for_tensorrt(tmp_path: Path) -> None:
    net, shape = small_network()
    profile = tiny("torch-cpu")
    once, artifact = artifact_timer(profile, module=net, onnx_path=tmp_path / "absent.onnx", engine_path=None,
                                    input_shape=shape)
    assert artifact == "torch module (torch-cpu)"
    assert_sane(once(), profile.repeats)
    with pytest.raises(HwnasError, match="times TensorRT engines: export with --format tensorrt"):
        artifact_timer(load_profile("cuda-tensorrt-fp16"), module=net, onnx_path=tmp_path / "absent.onnx",
                       engine_path=None, input_shape=shape)


# ---- CUDA -----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="checks the error where no CUDA GPU is present")
@pytest.mark.parametrize("name", ["cuda-torch-fp16", "cuda-torch-graph", "cuda-tensorrt-fp16"])
def test_get_backend_on_a_cuda_profile_without_cuda_is_a_clear_error(name: str) -> None:
    with pytest.raises(HwnasError, match=rf"{name}\.toml: backend \S+ needs a CUDA GPU, but torch sees none"):
        get_backend(load_profile(name))


class GpuSleep(nn.Module):
    """A kernel that spins `cycles` GPU clock cycles, launched in microseconds: tells GPU time from launch time."""

    def __init__(self, cycles: int = 2_000_000) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.cycles = cycles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(self.cycles)
        return x * self.scale


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graph"])
def test_cuda_backends_time_real_blocks_and_networks(backend: str) -> None:
    profile = tiny(backend, "fp16", batch_size=2, channels_last=True)
    runner = get_backend(profile)
    block, block_shape = small_block()
    net, net_shape = small_network()
    assert_sane(runner.time_module(block, block_shape), profile.repeats)
    assert_sane(runner.time_module(net, net_shape), profile.repeats)
    # The caller's module stays where it was, in fp32.
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in block.parameters())


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graph"])
def test_cuda_events_measure_gpu_time_not_launch_time(backend: str) -> None:
    """A kernel that keeps the GPU busy ~1 ms launches in microseconds; the samples must show the ms."""
    timing = get_backend(tiny(backend)).time_module(GpuSleep(2_000_000), (1, 2, 2))
    # 2e6 cycles: 1.0 ms at an H100's 1980 MHz maximum, 0.67 ms even at 3 GHz, longer at lower clocks.
    assert 0.5 <= timing.median_ms <= 50.0, timing
    assert timing.n == 7


@needs_cuda
@pytest.mark.gpu
def test_graph_replay_gives_the_eager_output() -> None:
    net, shape = small_network()
    backend = get_backend(tiny("torch-cuda-graph", batch_size=4))
    model, example = backend.prepare(net, shape)  # type: ignore[attr-defined]
    runner = CudaGraphRunner(model, example)
    for seed in (1, 2):  # fresh inputs go through the static input buffer
        x = torch.randn(example.shape, generator=torch.Generator().manual_seed(seed)).to(example.device)
        with torch.no_grad():
            eager = model(x)
        replayed = runner(x).clone()
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
        assert not torch.equal(replayed, torch.zeros_like(replayed))


@needs_cuda
@pytest.mark.gpu
def test_fp16_output_is_close_to_fp32() -> None:
    net, shape = small_network()
    net.eval()
    outs = []
    for precision in ("fp32", "fp16"):
        backend = get_backend(tiny("torch-cuda", precision, batch_size=4, channels_last=precision == "fp16"))
        model, x = backend.prepare(net, shape)  # type: ignore[attr-defined]
        assert x.dtype == (torch.float16 if precision == "fp16" else torch.float32)
        with torch.inference_mode():
            outs.append(model(x).float().cpu())
    ref = outs[0].double()
    rel = float((outs[1].double() - ref).norm() / ref.norm())
    assert rel < 2e-2, rel
    assert torch.isfinite(outs[1]).all()


@needs_cuda
@pytest.mark.gpu
def test_batch_64_profiles_prepare_a_batch_of_64() -> None:
    block, shape = small_block()
    for name in ("cuda-torch-fp16-b64", "cuda-torch-graph-b64"):
        backend = get_backend(load_profile(name))
        _, x = backend.prepare(block, shape)  # type: ignore[attr-defined]
        assert tuple(x.shape) == (64, *shape) and x.dtype == torch.float16
        assert x.is_contiguous(memory_format=torch.channels_last)


# ---- TensorRT -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (CUDA and _tensorrt_present()), reason="needs a CUDA device and TensorRT")
@pytest.mark.gpu
def test_tensorrt_times_a_real_block() -> None:
    profile = tiny("tensorrt", "fp16")
    runner = get_backend(profile)
    block, shape = small_block()
    assert_sane(runner.time_module(block, shape), profile.repeats)
    assert_sane(runner.time_module(block, shape), profile.repeats)  # the engine is reused


@pytest.mark.skipif(not (CUDA and _tensorrt_present()), reason="needs a CUDA device and TensorRT")
@pytest.mark.gpu
def test_artifact_timer_times_a_built_engine(tmp_path: Path) -> None:
    from exporters.onnx import export_module
    from exporters.tensorrt import build_engine

    net, shape = small_network()
    profile = tiny("tensorrt", "fp16", batch_size=2)
    onnx_path = export_module(net, tmp_path / "subnet.onnx", shape, batch_size=2, dynamic_batch=False)
    engine = build_engine(onnx_path, tmp_path / "subnet.engine", precision="fp16", min_batch=2, opt_batch=2,
                          max_batch=2).engine_path
    once, artifact = artifact_timer(profile, module=net, onnx_path=onnx_path, engine_path=engine, input_shape=shape)
    assert artifact == str(engine)
    assert_sane(once(), profile.repeats)
    assert_sane(once(), profile.repeats)  # the engine is loaded once and kept


@pytest.mark.skipif(not CUDA or _tensorrt_present(), reason="checks the error where CUDA is present, TensorRT not")
def test_tensorrt_profile_without_tensorrt_is_a_clear_error() -> None:
    with pytest.raises(HwnasError, match="(?i)tensorrt"):
        get_backend(load_profile("cuda-tensorrt-fp16"))

