"""`depthwise_conv2d` computes torch's depthwise conv, values and gradients, and `fast_depthwise` undoes itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwnas.depthwise import depthwise_conv2d, fast_depthwise, reachable_kernel


@pytest.mark.parametrize(("kernel", "height", "width", "stride", "expected"), [
    (7, 4, 4, 1, 7), (7, 2, 2, 1, 3), (7, 1, 1, 1, 1), (5, 2, 3, 1, 5),
    (7, 3, 2, 1, 5), (7, 2, 2, 2, 7), (3, 8, 8, 1, 3),
])
def test_reachable_kernel(kernel: int, height: int, width: int, stride: int, expected: int) -> None:
    assert reachable_kernel(kernel, height, width, stride) == expected


def _reference_and_ours(x: torch.Tensor, weight: torch.Tensor, stride: int):
    results = []
    for conv in (lambda a, w: F.conv2d(a, w, None, stride, w.shape[-1] // 2, 1, a.shape[1]),
                 lambda a, w: depthwise_conv2d(a, w, stride)):
        a, w = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = conv(a, w)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), a.grad, w.grad))
    return results


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 2), (3, 3), (4, 4), (2, 5), (3, 5), (6, 4), (8, 8)])
def test_same_values_and_gradients_as_torch(kernel: int, height: int, width: int, stride: int,
                                            channels_last: bool) -> None:
    torch.manual_seed(kernel * 100 + height * 10 + width)
    x = torch.randn(3, 6, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 1, kernel, kernel)
    (out_ref, gx_ref, gw_ref), (out, gx, gw) = _reference_and_ours(x, weight, stride)
    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [2, 4])
def test_without_gradients_torch_computes_it(side: int) -> None:
    """Forward alone, torch's kernels are fast: only the exact tap crop applies (same products, same sums)."""
    x, weight = torch.randn(4, 8, side, side), torch.randn(8, 1, 7, 7, requires_grad=True)
    with torch.no_grad():
        got = depthwise_conv2d(x, weight, 1)
    keep = 2 * side - 1
    start = (7 - keep) // 2
    crop = weight.detach()[:, :, start:start + keep, start:start + keep]
    assert torch.equal(got, F.conv2d(x, crop, None, 1, keep // 2, 1, 8))


def test_unreachable_taps_get_zero_gradient_as_in_torch() -> None:
    x, weight = torch.randn(2, 4, 2, 2), torch.randn(4, 1, 7, 7)
    (_, _, gw_ref), (_, _, gw) = _reference_and_ours(x, weight, 1)
    outer = torch.ones(7, 7, dtype=torch.bool)
    outer[2:5, 2:5] = False
    assert torch.count_nonzero(gw[:, :, outer]) == 0
    assert torch.count_nonzero(gw_ref[:, :, outer]) == 0
    assert torch.count_nonzero(gw[:, :, 2:5, 2:5]) > 0


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                         nn.Conv2d(8, 8, 7, stride=1, padding=3, groups=8, bias=False),
                         nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True))  # with a bias: left alone


def test_fast_depthwise_same_function_and_restores_the_modules() -> None:
    net = _net()
    x = torch.randn(2, 3, 4, 4)
    keys = list(net.state_dict())
    expected = net(x)
    with fast_depthwise(net) as inside:
        assert inside is net
        assert [type(m).__name__ for m in net] == ["Conv2d", "_TrainingDepthwise", "_TrainingDepthwise", "Conv2d"]
        assert list(net.state_dict()) == keys
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    assert all(type(m) is nn.Conv2d for m in net)
    with pytest.raises(RuntimeError, match="boom"), fast_depthwise(net):
        raise RuntimeError("boom")
    assert all(type(m) is nn.Conv2d for m in net)


def _benchmark():
    from _benchmarks import load_benchmark

    return load_benchmark("depthwise_speed")


def test_benchmark_writes_every_shape_and_restores_the_supernet(tmp_path) -> None:
    import json

    from hwnas.supernet import ops

    bench = _benchmark()
    argv = ["--batch", "2", "--op-batch", "2", "--eval-batch", "2", "--repeats", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    shapes = {(r["channels"], r["side"], r["kernel"], r["stride"]) for r in summary["ops"]}
    assert (576, 2, 7, 1) in shapes and (288, 2, 3, 1) in shapes  # the largest's and smallest's last stage
    for part in (*summary["ops"], summary["supernet_step"], summary["standalone_step"], summary["supernet_eval"]):
        assert part["speedup"] > 0
    assert ops.depthwise_conv2d is depthwise_conv2d  # the baseline's swap was undone


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--device", "nonsense"]])
def test_benchmark_refuses_bad_arguments_in_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        _benchmark().parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "error: " in err and argv[0] in err and "Traceback" not in err
