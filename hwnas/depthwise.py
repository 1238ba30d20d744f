"""Depthwise convolution that computes the same function as `F.conv2d`, faster where torch is slow.

On small feature maps torch's CPU kernel for the weight gradient of a large depthwise kernel is
pathologically slow: on the development VM (2 vCPUs, torch 2.14.1, oneDNN) the weight gradient of a
7x7 depthwise conv over a 4x4 map took about 60 times its forward pass, and it made up most of a
supernet training step on mbv3-32, whose last stages run at 4x4 and 2x2. Measured, torch is slow
there when the padding is at least half the map's side, and fast elsewhere. So
(see benchmarks/depthwise_speed.py for the figures):

- taps that no output can reach are dropped: at stride 1 an n-pixel side is reached only by the
  centre 2n-1 taps, the others multiply padding alone. Exact: the same products are summed.
  This applies on every device.
- where torch is slow (CPU, padding >= half the side) and the weight's gradient is wanted, the
  forward and the input's gradient stay torch's, and the weight's gradient is computed as one
  small matrix product per channel ((output pixels x batch) times (batch x input pixels)), whose
  entries are then summed into the kernel taps that join each pair of pixels. Equal to float
  rounding: the same products, summed in another order.

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
from torch.autograd.function import once_differentiable


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
    slow_weight_gradient = pad and x.device.type == "cpu" and 2 * pad >= min(height, width)
    if slow_weight_gradient and torch.is_grad_enabled() and weight.requires_grad:
        return _MatrixWeightGradient.apply(x, weight, stride)
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
    return index.reshape(-1), out_h, out_w


class _MatrixWeightGradient(torch.autograd.Function):
    """torch's depthwise conv, whose weight gradient is a batched matmul and a scatter into the taps."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        stride, (batch, channels, height, width), kernel = ctx.stride, x.shape, weight.shape[-1]
        pad = kernel // 2
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], channels,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            index, out_h, out_w = _tap_index(height, width, kernel, stride)
            grad_rows = grad.permute(1, 2, 3, 0).reshape(channels, out_h * out_w, batch).contiguous()
            x_columns = x.permute(1, 0, 2, 3).reshape(channels, batch, height * width).contiguous()
            pairs = torch.bmm(grad_rows, x_columns).reshape(channels, -1)  # channel x (output, input) pixel pairs
            taps = pairs.new_zeros(channels, kernel * kernel + 1).index_add_(1, index.to(pairs.device), pairs)
            grad_weight = taps[:, :-1].reshape(weight.shape)
        return grad_x, grad_weight, None


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
