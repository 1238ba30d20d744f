"""Static blocks built from a `BlockSpec`, out of plain torch layers.

`Supernet.extract` and the latency profiler both build through `build_block`, so the module a
latency-table row was measured on is the very module the exported subnet runs.
"""

from __future__ import annotations

import torch
from torch import nn

from hwnas.space import BlockSpec, make_divisible


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                act: str | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(activation(act))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-and-excite: a channel gate from globally pooled features."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MBConv: optional 1x1 expansion, depthwise conv, optional SE, 1x1 projection, residual."""

    def __init__(self, cin: int, cout: int, hidden: int, kernel: int, stride: int, act: str,
                 se_channels: int = 0) -> None:
        super().__init__()
        self.expand = conv_bn_act(cin, hidden, 1, act=act) if hidden != cin else None
        self.depthwise = conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, se_channels) if se_channels else None
        self.project = conv_bn_act(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.depthwise(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        return x + out if self.residual else out


class Head(nn.Module):
    """MobileNetV3's head: 1x1 expansion, global pooling, feature layer, classifier."""

    def __init__(self, cin: int, hidden: int, feature: int, num_classes: int, act: str,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.final_expand = conv_bn_act(cin, hidden, 1, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_mix = nn.Sequential(nn.Conv2d(hidden, feature, 1, bias=False), activation(act))
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_mix(self.pool(self.final_expand(x)))
        return self.classifier(self.dropout(self.flatten(x)))


def se_channels(hidden: int, se_ratio: float = 0.25) -> int:
    return make_divisible(hidden * se_ratio)


def build_block(spec: BlockSpec, se_ratio: float = 0.25, dropout: float = 0.0) -> nn.Module:
    """The static module of one block, freshly initialised."""
    if spec.kind == "stem":
        return conv_bn_act(spec.cin, spec.cout, spec.kernel, spec.stride, act=spec.act)
    if spec.kind == "first":
        return InvertedResidual(spec.cin, spec.cout, spec.cin, spec.kernel, spec.stride, spec.act)
    if spec.kind == "mbconv":
        se = se_channels(spec.hidden, se_ratio) if spec.se else 0
        return InvertedResidual(spec.cin, spec.cout, spec.hidden, spec.kernel, spec.stride, spec.act, se)
    if spec.kind == "head":
        return Head(spec.cin, spec.hidden, spec.feature, spec.cout, spec.act, dropout)
    raise ValueError(f"unknown block kind {spec.kind!r}")


def build_network(specs: list[BlockSpec], se_ratio: float = 0.25, dropout: float = 0.0) -> nn.Sequential:
    """A static network, block after block, freshly initialised."""
    return nn.Sequential(*(build_block(spec, se_ratio, dropout) for spec in specs))
