"""Dynamic ops of the weight-sharing supernet (Once-for-All style).

Each op holds the weights of its largest shape and runs a smaller shape by slicing them: the
kernel is the centre crop of the largest kernel (optionally passed through learned transforms),
channels are the first N (which `sort_hidden_channels` makes the most important N). What to run
arrives as call arguments or is read off the input's shape, so no op carries a mutable "active"
setting. Every op can copy its active weights into its static twin from `hwnas.blocks`, which is
how `Supernet.extract` cuts out a subnet of plain torch layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hwnas.blocks import InvertedResidual, SqueezeExcite, activation, se_channels
from hwnas.depthwise import depthwise_conv2d


def _centre(size: int, sub: int) -> slice:
    start = (size - sub) // 2
    return slice(start, start + sub)


class DynamicConv2d(nn.Module):
    """A conv whose kernel and channels shrink at run time: regular, or depthwise (groups == channels).

    With `kernel_transform`, a smaller kernel is not the bare centre crop of the larger one: OFA
    found that forcing one set of weights to serve as 7x7, 5x5 and 3x3 kernels at once hurts the
    small ones, so each step down (7->5, 5->3) passes the crop through a learned linear map of its
    k*k taps, shared by all channels of the layer and starting as the identity.
    """

    def __init__(self, max_in: int, max_out: int, kernel_sizes: Sequence[int] = (1,), stride: int = 1,
                 depthwise: bool = False, kernel_transform: bool = False) -> None:
        super().__init__()
        sizes = tuple(sorted(set(int(k) for k in kernel_sizes)))
        if any(k % 2 == 0 for k in sizes):
            raise ValueError(f"kernel sizes must be odd to keep 'same' padding, got {sizes}")
        if depthwise and max_in != max_out:
            raise ValueError(f"a depthwise conv maps channels one to one, got {max_in} -> {max_out}")
        self.max_in, self.max_out = max_in, max_out
        self.kernel_sizes = sizes
        self.stride = stride
        self.depthwise = depthwise
        kmax = sizes[-1]
        self.weight = nn.Parameter(torch.empty(max_out, 1 if depthwise else max_in, kmax, kmax))
        self.transforms = nn.ParameterDict()
        if kernel_transform:
            for small, large in zip(sizes[:-1], sizes[1:], strict=True):
                self.transforms[f"{large}to{small}"] = nn.Parameter(torch.eye(small * small))
        self.reset_parameters()

    @property
    def kernel_transform(self) -> bool:
        return len(self.transforms) > 0

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        for matrix in self.transforms.values():
            with torch.no_grad():
                matrix.copy_(torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device))

    def active_kernel(self, kernel: int) -> torch.Tensor:
        """The full-channel kernel of size `kernel`: cropped, and transformed step by step if enabled."""
        if kernel not in self.kernel_sizes:
            raise ValueError(f"kernel {kernel} is not one of {self.kernel_sizes}")
        weight: torch.Tensor = self.weight
        if not self.transforms:
            sl = _centre(weight.shape[-1], kernel)
            return weight[:, :, sl, sl]
        for large, small in zip(reversed(self.kernel_sizes[1:]), reversed(self.kernel_sizes[:-1]), strict=True):
            if large <= kernel:
                break
            sl = _centre(large, small)
            crop = weight[:, :, sl, sl].reshape(weight.shape[0], weight.shape[1], small * small)
            weight = F.linear(crop, self.transforms[f"{large}to{small}"]).reshape(
                weight.shape[0], weight.shape[1], small, small)
        return weight

    def active_weight(self, in_channels: int, out_channels: int, kernel: int) -> torch.Tensor:
        """The weight of the static conv that this op runs as (depthwise: out_channels == in_channels)."""
        if in_channels > self.max_in or out_channels > self.max_out:
            raise ValueError(f"{in_channels}->{out_channels} channels exceed the op's {self.max_in}->{self.max_out}")
        if self.depthwise:
            if in_channels != out_channels:
                raise ValueError(f"a depthwise conv maps channels one to one, got {in_channels} -> {out_channels}")
            return self.active_kernel(kernel)[:out_channels]
        return self.active_kernel(kernel)[:out_channels, :in_channels]

    def forward(self, x: torch.Tensor, out_channels: int | None = None, kernel: int | None = None) -> torch.Tensor:
        in_channels = x.shape[1]
        if self.depthwise:
            out_channels = in_channels
        elif out_channels is None:
            out_channels = self.max_out
        kernel = self.kernel_sizes[-1] if kernel is None else kernel
        weight = self.active_weight(in_channels, out_channels, kernel)
        if self.depthwise:
            return depthwise_conv2d(x, weight, self.stride)
        return F.conv2d(x, weight, None, self.stride, kernel // 2)

    def copy_active_to(self, conv: nn.Module) -> None:
        """Fill a static conv (its shape names the active setting) with this op's active weights."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.stride != (self.stride, self.stride) or conv.bias is not None:
            raise ValueError(f"cannot copy into {conv}: stride or bias differ from the dynamic op")
        kernel = conv.kernel_size[0]
        with torch.no_grad():
            conv.weight.copy_(self.active_weight(conv.in_channels, conv.out_channels, kernel))

    def extra_repr(self) -> str:
        kind = "depthwise" if self.depthwise else "regular"
        return (f"{self.max_in}, {self.max_out}, kernel_sizes={self.kernel_sizes}, stride={self.stride}, {kind}, "
                f"kernel_transform={self.kernel_transform}")


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of its largest width, C read off the input.

    It subclasses `nn.BatchNorm2d` so that code that looks for BN layers (recalibration, weight
    decay exclusion) finds it. In training mode the running statistics of the active channels are
    updated in place, with the same momentum rule (None: cumulative average) as torch's layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels == self.num_features:
            return super().forward(x)
        if channels > self.num_features:
            raise ValueError(f"{channels} channels exceed the layer's {self.num_features}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        use_running = not self.training or self.track_running_stats
        mean = self.running_mean[:channels] if use_running and self.running_mean is not None else None
        var = self.running_var[:channels] if use_running and self.running_var is not None else None
        weight = self.weight[:channels] if self.weight is not None else None
        bias = self.bias[:channels] if self.bias is not None else None
        return F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, self.eps)

    def copy_active_to(self, bn: nn.Module) -> None:
        """Copy the first `bn.num_features` channels: affine weights, running stats and the batch count."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected an nn.BatchNorm2d, got {type(bn).__name__}")
        channels = bn.num_features
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                source, target = getattr(self, name), getattr(bn, name)
                if target is not None:
                    target.copy_(source[:channels])
            if bn.num_batches_tracked is not None and self.num_batches_tracked is not None:
                bn.num_batches_tracked.copy_(self.num_batches_tracked)

    def permute_(self, order: torch.Tensor) -> None:
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                tensor = getattr(self, name)
                if tensor is not None:
                    tensor.copy_(tensor[order])


class DynamicSE(nn.Module):
    """MobileNetV3's squeeze-and-excite over the active channels.

    The reduced width follows the active width (`hwnas.blocks.se_channels`), as in the static
    block of the same width, so the subnet keeps the SE it would have had if built alone.
    """

    def __init__(self, max_channels: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        self.max_channels = max_channels
        self.se_ratio = se_ratio
        reduced = se_channels(max_channels, se_ratio)
        self.reduce_weight = nn.Parameter(torch.empty(reduced, max_channels, 1, 1))
        self.reduce_bias = nn.Parameter(torch.empty(reduced))
        self.expand_weight = nn.Parameter(torch.empty(max_channels, reduced, 1, 1))
        self.expand_bias = nn.Parameter(torch.empty(max_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.reduce_weight, mode="fan_out")
        nn.init.kaiming_normal_(self.expand_weight, mode="fan_out")
        nn.init.zeros_(self.reduce_bias)
        nn.init.zeros_(self.expand_bias)

    def reduced(self, channels: int) -> int:
        return se_channels(channels, self.se_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        reduced = self.reduced(channels)
        scale = x.mean((2, 3), keepdim=True)
        scale = F.relu(F.conv2d(scale, self.reduce_weight[:reduced, :channels], self.reduce_bias[:reduced]))
        scale = F.conv2d(scale, self.expand_weight[:channels, :reduced], self.expand_bias[:channels])
        return x * F.hardsigmoid(scale)

    def copy_active_to(self, se: SqueezeExcite | None) -> None:
        if se is None or se.reduce.bias is None or se.expand.bias is None:
            raise ValueError("the static block has no squeeze-excite (with biases) to copy into")
        channels, reduced = se.reduce.in_channels, se.reduce.out_channels
        if reduced != self.reduced(channels):
            raise ValueError(f"static SE has {reduced} reduced channels, expected {self.reduced(channels)}")
        with torch.no_grad():
            se.reduce.weight.copy_(self.reduce_weight[:reduced, :channels])
            se.reduce.bias.copy_(self.reduce_bias[:reduced])
            se.expand.weight.copy_(self.expand_weight[:channels, :reduced])
            se.expand.bias.copy_(self.expand_bias[:channels])

    def permute_(self, order: torch.Tensor) -> None:
        """Permute the gated channels, then sort the reduced ones by the L1 norm of their expand weights."""
        with torch.no_grad():
            self.reduce_weight.copy_(self.reduce_weight[:, order])
            self.expand_weight.copy_(self.expand_weight[order])
            self.expand_bias.copy_(self.expand_bias[order])
            reduced_order = _importance_order(self.expand_weight.abs().sum(dim=(0, 2, 3)))
            self.reduce_weight.copy_(self.reduce_weight[reduced_order])
            self.reduce_bias.copy_(self.reduce_bias[reduced_order])
            self.expand_weight.copy_(self.expand_weight[:, reduced_order])


def _importance_order(importance: torch.Tensor) -> torch.Tensor:
    """Channels by decreasing importance; ties keep their order, so sorting twice changes nothing."""
    return torch.sort(importance, descending=True, stable=True).indices


class DynamicInvertedResidual(nn.Module):
    """The dynamic twin of `hwnas.blocks.InvertedResidual`: elastic kernel and hidden width.

    Input and output widths are fixed per block position (only the hidden width is elastic), so
    whether the residual applies is fixed too. Like the static block, the 1x1 expansion is skipped
    when the active hidden width equals the input width.
    """

    def __init__(self, cin: int, cout: int, hidden_choices: Sequence[int], kernel_sizes: Sequence[int],
                 stride: int, act: str, se_ratio: float | None = None, kernel_transform: bool = False) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.hidden_choices = tuple(sorted(set(int(h) for h in hidden_choices)))
        self.kernel_sizes = tuple(sorted(set(int(k) for k in kernel_sizes)))
        max_hidden = self.hidden_choices[-1]
        self.max_hidden = max_hidden
        needs_expand = any(h != cin for h in self.hidden_choices)
        self.expand_conv = DynamicConv2d(cin, max_hidden) if needs_expand else None
        self.expand_bn = DynamicBatchNorm2d(max_hidden) if needs_expand else None
        self.dw_conv = DynamicConv2d(max_hidden, max_hidden, self.kernel_sizes, stride, depthwise=True,
                                     kernel_transform=kernel_transform)
        self.dw_bn = DynamicBatchNorm2d(max_hidden)
        self.se = DynamicSE(max_hidden, se_ratio) if se_ratio is not None else None
        self.project_conv = DynamicConv2d(max_hidden, cout)
        self.project_bn = nn.BatchNorm2d(cout)
        self.act = activation(act)
        self.residual = stride == 1 and cin == cout

    def _check(self, kernel: int, hidden: int) -> None:
        if hidden not in self.hidden_choices:
            raise ValueError(f"hidden width {hidden} is not one of {self.hidden_choices}")
        if kernel not in self.kernel_sizes:
            raise ValueError(f"kernel {kernel} is not one of {self.kernel_sizes}")

    def forward(self, x: torch.Tensor, kernel: int, hidden: int) -> torch.Tensor:
        self._check(kernel, hidden)
        out = x
        if hidden != self.cin:
            assert self.expand_conv is not None and self.expand_bn is not None
            out = self.act(self.expand_bn(self.expand_conv(out, hidden)))
        out = self.act(self.dw_bn(self.dw_conv(out, kernel=kernel)))
        if self.se is not None:
            out = self.se(out)
        out = self.project_bn(self.project_conv(out, self.cout))
        return x + out if self.residual else out

    def copy_active_to(self, block: nn.Module) -> None:
        """Fill a static block built for one (kernel, hidden) setting with the shared weights."""
        if not isinstance(block, InvertedResidual):
            raise TypeError(f"expected an InvertedResidual, got {type(block).__name__}")
        conv = block.depthwise[0]
        assert isinstance(conv, nn.Conv2d)
        kernel, hidden = conv.kernel_size[0], conv.out_channels
        self._check(kernel, hidden)
        if (block.expand is None) != (hidden == self.cin) or (block.se is None) != (self.se is None):
            raise ValueError("the static block's layers do not match this dynamic block")
        if block.expand is not None:
            assert self.expand_conv is not None and self.expand_bn is not None
            self.expand_conv.copy_active_to(block.expand[0])
            self.expand_bn.copy_active_to(block.expand[1])
        self.dw_conv.copy_active_to(conv)
        self.dw_bn.copy_active_to(block.depthwise[1])
        if self.se is not None:
            self.se.copy_active_to(block.se)
        self.project_conv.copy_active_to(block.project[0])
        block.project[1].load_state_dict(self.project_bn.state_dict())

    def sort_hidden_channels(self) -> bool:
        """OFA's channel re-organisation: hidden channels by decreasing L1 norm of their projection weights.

        A permutation of the hidden channels, applied to every layer that reads or writes them,
        leaves the widest setting's function unchanged and puts the most important channels
        first, where the narrower settings find them. Returns False (and changes nothing) when a
        setting skips the expansion, since the hidden channels are then the block's input.
        """
        if self.expand_conv is None or self.expand_bn is None or self.cin in self.hidden_choices:
            return False
        with torch.no_grad():
            order = _importance_order(self.project_conv.weight.abs().sum(dim=(0, 2, 3)))
            self.project_conv.weight.copy_(self.project_conv.weight[:, order])
            if self.se is not None:
                self.se.permute_(order)
            self.dw_conv.weight.copy_(self.dw_conv.weight[order])
            self.dw_bn.permute_(order)
            self.expand_conv.weight.copy_(self.expand_conv.weight[order])
            self.expand_bn.permute_(order)
        return True

    def extra_repr(self) -> str:
        return (f"cin={self.cin}, cout={self.cout}, hidden_choices={self.hidden_choices}, "
                f"stride={self.stride}, residual={self.residual}")


def init_weights(module: nn.Module, zero_last_gamma: bool = False) -> None:
    """MobileNetV3's init (as torchvision's): kaiming fan-out convs, unit BN, small classifier.

    With `zero_last_gamma`, the last BN of every residual block starts at zero, so each such
    block starts as the identity: the sandwich rule trains subnets of every depth from the first
    step, and a block that a shallow subnet skips and a deep one runs starts out agreeing with both.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, DynamicConv2d | DynamicSE):
            m.reset_parameters()
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if zero_last_gamma:
        for m in module.modules():
            if isinstance(m, DynamicInvertedResidual) and m.residual:
                nn.init.zeros_(m.project_bn.weight)
            elif isinstance(m, InvertedResidual) and m.residual:
                bn = m.project[1]
                assert isinstance(bn, nn.BatchNorm2d)
                nn.init.zeros_(bn.weight)


__all__ = ["DynamicBatchNorm2d", "DynamicConv2d", "DynamicInvertedResidual", "DynamicSE", "init_weights"]
