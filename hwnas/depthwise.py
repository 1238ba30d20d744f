"""Depthwise convolution that computes the same function as `F.conv2d`, faster where torch is slow.

On small feature maps torch's CPU kernels for the weight gradient of a large depthwise kernel are
pathologically slow: on the development VM (2 vCPUs, torch 2.14.1, oneDNN) the weight gradient of a
7x7 depthwise conv over a 4x4 map took about 60 times its forward pass, and it made up most of a supernet
training step on mbv3-32, whose last stages run at 4x4 and 2x2. Two rewrites remove that without
changing the function (see benchmarks/depthwise_speed.py for the figures):

- taps that no output can reach are dropped: at stride 1 an n-pixel side is reached only by the
  centre 2n-1 taps, the others multiply padding alone. Exact: the same products are summed.
- on CPU, when the padding is at least half the map's side (where torch was slow), the map is
  zero-padded explicitly and convolved without padding, which runs 1.2-8x faster; below that
  the explicit pad made it 1.5-2x slower. Equal to float rounding (the summation order differs).

Only training and evaluation in torch go through here. The exported static layers stay plain
`nn.Conv2d` with their full kernels, so ONNX graphs and latency tables are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    if pad and x.device.type == "cpu" and 2 * pad >= min(height, width):
        return F.conv2d(F.pad(x, (pad, pad, pad, pad)), weight, None, stride, 0, 1, x.shape[1])
    return F.conv2d(x, weight, None, stride, pad, 1, x.shape[1])


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
