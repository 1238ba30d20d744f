"""`Supernet`: every subnet of a search space in one set of shared weights.

The stem, the fixed first block and the head have one shape in every subnet, so they are the
static layers of `hwnas.blocks`; each stage holds `space.max_depth` dynamic inverted-residual
blocks at the largest kernel and hidden width. The active arch decides which blocks run and at
which kernel and width; `extract` copies those weights into the static network that
`hwnas.blocks.build_network` builds from `space.blocks(arch)`, the same modules the latency
tables were measured on.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from hwnas.blocks import build_block, build_network
from hwnas.space import Arch, SearchSpace
from hwnas.supernet.ops import DynamicInvertedResidual, init_weights


class Supernet(nn.Module):
    """The weight-sharing supernet of a `SearchSpace`.

    `forward` runs the active arch (the largest until `set_active` says otherwise) on an input
    already at `arch.resolution`: the model does not resize, since resizing belongs to the data
    pipeline that the exported subnet will also see.
    """

    def __init__(self, space: SearchSpace, kernel_transform: bool = False, zero_last_gamma: bool = True) -> None:
        super().__init__()
        self.space = space
        self.kernel_transform = kernel_transform
        largest = space.largest()
        specs = space.blocks(largest)
        self.stem = build_block(specs[0], space.se_ratio)
        self.first = build_block(specs[1], space.se_ratio)
        self.stages = nn.ModuleList()
        for stage_index, stage in enumerate(space.stages):
            blocks = nn.ModuleList()
            for index in range(space.max_depth):
                cin = space.block_in_channels(stage_index, index)
                hidden = [space.hidden_channels(cin, e) for e in space.expand_choices]
                blocks.append(DynamicInvertedResidual(
                    cin, stage.out_channels, hidden, space.kernel_choices, stage.stride if index == 0 else 1,
                    stage.act, space.se_ratio if stage.se else None, kernel_transform))
            self.stages.append(blocks)
        self.head = build_block(specs[-1], space.se_ratio, space.dropout)
        self._active = largest
        init_weights(self, zero_last_gamma=zero_last_gamma)

    def config(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this module before loading its state_dict."""
        return {"space": self.space.to_dict(), "kernel_transform": self.kernel_transform}

    @property
    def active_arch(self) -> Arch:
        return self._active

    def set_active(self, arch: Arch) -> Supernet:
        """Run `arch` from now on; returns self, so `net.set_active(arch)(x)` reads as one call."""
        self._active = self.space.validate(arch)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arch = self._active
        x = self.first(self.stem(x))
        for stage, index, kernel, expand in self.space.iter_stage_blocks(arch):
            block = self.block(stage, index)
            x = block(x, kernel, self.space.hidden_channels(block.cin, expand))
        return self.head(x)

    def block(self, stage: int, index: int) -> DynamicInvertedResidual:
        """The dynamic block at position `index` of `stage` (whether or not the active arch runs it)."""
        return cast(DynamicInvertedResidual, cast(nn.ModuleList, self.stages[stage])[index])

    def extract(self, arch: Arch) -> nn.Sequential:
        """The static subnet of `arch`: plain torch layers holding copies of the shared weights.

        It computes what `set_active(arch)(x)` computes, is independent of the supernet (training
        one does not move the other), and comes in the supernet's device, dtype and training mode.
        """
        specs = self.space.blocks(arch)
        reference = next(self.parameters())
        net = build_network(specs, self.space.se_ratio, self.space.dropout).to(reference.device, reference.dtype)
        with torch.no_grad():
            net[0].load_state_dict(self.stem.state_dict())
            net[1].load_state_dict(self.first.state_dict())
            net[-1].load_state_dict(self.head.state_dict())
            for static, (stage, index, _, _) in zip(net[2:-1], self.space.iter_stage_blocks(arch), strict=True):
                self.block(stage, index).copy_active_to(static)
        return net.train(self.training)

    def sort_channels(self) -> None:
        """Put each block's most important hidden channels first (OFA, before shrinking the width).

        The widest subnet computes the same function afterwards; narrower ones change, which is
        the point: they then run on the channels that matter most to the widest one.
        """
        for stage in range(self.space.num_stages):
            for index in range(self.space.max_depth):
                self.block(stage, index).sort_hidden_channels()

    def extra_repr(self) -> str:
        return f"space={self.space.name!r}, kernel_transform={self.kernel_transform}"
