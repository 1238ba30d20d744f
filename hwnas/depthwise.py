"""Depthwise convolution that computes the same function as `F.conv2d`, faster where torch is slow.

On small feature maps torch's CPU kernels for the weight gradient of a large depthwise kernel are
pathologically slow: on the development VM (2 vCPUs, torch 2.14.1, oneDNN) the weight gradient of a
7x7 depthwise conv over a 4x4 map took about 60 times its forward pass, and it made up most of a supernet
training step on mbv3-32, whose last stages run at 4x4 and 2x2. Where torch is slow (on CPU, a
padding of at least half the map's side, measured) the conv is computed another way, and
elsewhere it is left to torch (see benchmarks/depthwise_speed.py for the figures):

- taps that no output can reach are dropped: at stride 1 an n-pixel side is reached only by the
  centre 2n-1 taps, the others multiply padding alone. Exact: the same products are summed.
  This applies on every device.
- maps of 3 or 4 pixels a side run as one small (output pixels x input pixels) matrix per
  channel, applied by a batched matmul: 5-9x faster than torch's kernels there.
- maps of 1 or 2 pixels a side are zero-padded explicitly and convolved without padding, which
  takes a fast path of oneDNN: 8-16x faster. (Padding explicitly where the padding is less than
  half the side made things 1.5-2x slower, so it is not done there.)

The last two are equal to float rounding (the summation order differs). They are used only when
the weight's gradient is wanted: torch's forward is fast, and run alone (evaluation, search) these
paths were 1.5-5x slower than it.

Only training and evaluation in torch go through here. The exported static layers stay plain
`nn.Conv2d` with their full kernels, so ONNX graphs and latency tables are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def reachable_kernel(kernel: int, height: int, width: int, stride: int) -> int:
    """The largest odd kernel whose taps all reach some output of a 'same'-padded conv."""
    if stride != 1:
        return kernel
    return min(kernel, 2 * max(height, width) - 1)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """`F.conv2d(x, weight, stride=stride, padding=k // 2, groups=channels)` for an odd square kernel."""
    kernel = weight.shape[-1]
    height, width = x.shape[-2:]
    keep = reachable_kernel(kernel, height, width, stride)
    if keep < kernel:
        start = (kernel - keep) // 2
        weight, kernel = weight[:, :, start:start + keep, start:start + keep], keep
    pad = kernel // 2
    slow_in_torch = pad and x.device.type == "cpu" and 2 * pad >= min(height, width)
    if slow_in_torch and torch.is_grad_enabled() and weight.requires_grad:  # torch's forward alone is fast
        if min(height, width) >= 3:
            return _as_matrices(x, weight, stride)
        return F.conv2d(F.pad(x, (pad, pad, pad, pad)), weight, None, stride, 0, 1, x.shape[1])
    return F.conv2d(x, weight, None, stride, pad, 1, x.shape[1])


@functools.lru_cache(maxsize=64)
def _tap_index(height: int, width: int, kernel: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """For each (output pixel, input pixel) pair, the kernel tap joining them; kernel**2 where none does."""
    pad = kernel // 2
    out_h, out_w = (height + 2 * pad - kernel) // stride + 1, (width + 2 * pad - kernel) // stride + 1
    tap_y = torch.arange(height).view(1, 1, height, 1) - (torch.arange(out_h).view(out_h, 1, 1, 1) * stride - pad)
    tap_x = torch.arange(width).view(1, 1, 1, width) - (torch.arange(out_w).view(1, out_w, 1, 1) * stride - pad)
    inside = (tap_y >= 0) & (tap_y < kernel) & (tap_x >= 0) & (tap_x < kernel)
    index = torch.where(inside, tap_y * kernel + tap_x, kernel * kernel)
    return index.reshape(out_h * out_w, height * width), out_h, out_w


def _as_matrices(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """The conv as one (output pixels x input pixels) matrix per channel, applied by a batched matmul.

    On a map no wider than the kernel's reach that matrix is small (16 x 16 for 4x4 pixels) and
    holds the products a 7x7 kernel makes, so one `bmm` replaces torch's slow depthwise kernels.
    """
    batch, channels, height, width = x.shape
    kernel = weight.shape[-1]
    index, out_h, out_w = _tap_index(height, width, kernel, stride)
    taps = torch.cat([weight.reshape(channels, kernel * kernel), weight.new_zeros(channels, 1)], dim=1)
    matrices = taps[:, index.to(x.device)]
    columns = x.permute(1, 2, 3, 0).reshape(channels, height * width, batch).contiguous()
    out = _ContiguousGradient.apply(torch.bmm(matrices, columns))
    out = out.view(channels, out_h, out_w, batch).permute(3, 0, 1, 2)
    return out.contiguous(memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)


class _ContiguousGradient(torch.autograd.Function):
    """Identity forward; hands `bmm`'s backward a contiguous gradient, which torch's CPU bmm needs to be fast."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _is_plain_depthwise(module: nn.Module) -> bool:
    if type(module) is not nn.Conv2d or module.bias is not None:
        return False
    kernel, padding = module.kernel_size, module.padding
    return (module.groups == module.in_channels == module.out_channels and kernel[0] == kernel[1]
            and kernel[0] % 2 == 1 and padding == (kernel[0] // 2,) * 2 and module.dilation == (1, 1)
            and module.stride[0] == module.stride[1] and module.padding_mode == "zeros")


class _TrainingDepthwise(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.stride[0])


@contextlib.contextmanager
def fast_depthwise(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model's plain depthwise convs through `depthwise_conv2d` inside the block.

    The modules keep their class's parameters and names (only their `forward` differs while
    inside), so optimizers, state dicts and the returned model are those of the plain network.
    """
    convs = [m for m in model.modules() if _is_plain_depthwise(m)]
    for conv in convs:
        conv.__class__ = _TrainingDepthwise
    try:
        yield model
    finally:
        for conv in convs:
            conv.__class__ = nn.Conv2d


__all__ = ["depthwise_conv2d", "fast_depthwise", "reachable_kernel"]
