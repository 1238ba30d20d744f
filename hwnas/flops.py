"""FLOPs and parameter counts of blocks and subnets, counted by torch's own `FlopCounterMode`.

FLOPs are counted as torch counts them: 2 per multiply-add of convolutions and matmuls (BN,
activations, pooling and additions are not counted). Blocks are built and run on the meta device,
so counting costs no memory and no arithmetic, and each unique block is counted once: an arch's
count is a sum of cached block counts, cheap enough to score every candidate of a search.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hwnas.blocks import build_block
from hwnas.space import Arch, BlockSpec, SearchSpace


def model_flops(module: nn.Module, input_shape: tuple[int, int, int], batch_size: int = 1) -> int:
    """FLOPs of one eval-mode forward pass of `module` on a batch of `input_shape` (C, H, W) inputs."""
    reference = next(module.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    x = torch.zeros(batch_size, *input_shape, device=device, dtype=dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


def _meta_block(spec: BlockSpec, se_ratio: float) -> nn.Module:
    with torch.device("meta"):
        return build_block(spec, se_ratio)


@lru_cache(maxsize=65536)
def _block_flops(spec: BlockSpec, se_ratio: float) -> int:
    block = _meta_block(spec, se_ratio).eval()
    x = torch.zeros(1, spec.cin, spec.in_size, spec.in_size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(x)
    return int(counter.get_total_flops())


@lru_cache(maxsize=65536)
def _block_params(spec: BlockSpec, se_ratio: float) -> int:
    return sum(p.numel() for p in _meta_block(spec, se_ratio).parameters())


def block_flops(spec: BlockSpec, se_ratio: float = 0.25) -> int:
    """FLOPs of the block that `spec` names, for one image; cached per block (equal specs share a key)."""
    return _block_flops(spec, float(se_ratio))


def block_params(spec: BlockSpec, se_ratio: float = 0.25) -> int:
    """Trainable parameters of the block that `spec` names (BN affine weights included)."""
    return _block_params(spec, float(se_ratio))


def arch_flops(space: SearchSpace, arch: Arch) -> int:
    """FLOPs of the subnet `arch`, for one image at `arch.resolution`."""
    return sum(block_flops(spec, space.se_ratio) for spec in space.blocks(arch))


def arch_params(space: SearchSpace, arch: Arch) -> int:
    """Trainable parameters of the subnet `arch` (independent of its resolution)."""
    return sum(block_params(spec, space.se_ratio) for spec in space.blocks(arch))


class ArchCosts:
    """FLOPs and parameters of many archs of one space, summed from per-slot cached block counts.

    A block's spec depends only on its slot (`SearchSpace.slot_specs`), so each slot is counted
    once, the first time an arch uses it, and an arch costs a few dictionary lookups after that:
    cheap enough for every one of 50k candidates (`SearchSpace.flops_params` keeps one per space).
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self._fixed: dict[int, tuple[int, int]] = {}
        self._slots: dict[tuple[int, int, int, int, float], tuple[int, int]] = {}

    def _count(self, spec: BlockSpec) -> tuple[int, int]:
        return block_flops(spec, self.space.se_ratio), block_params(spec, self.space.se_ratio)

    def __call__(self, arch: Arch) -> tuple[int, int]:
        res = arch.resolution
        fixed = self._fixed.get(res)
        if fixed is None:
            self.space.validate(arch)
            counts = [self._count(spec) for spec in self.space.slot_specs(res).fixed]
            fixed = self._fixed[res] = (sum(f for f, _ in counts), sum(p for _, p in counts))
        flops, params = fixed
        slots = self._slots
        for slot in self.space.iter_stage_blocks(arch):
            key = (res, *slot)
            cost = slots.get(key)
            if cost is None:
                try:
                    spec = self.space.slot_specs(res).mbconv[slot]
                except KeyError:
                    self.space.validate(arch)  # names the bad field
                    raise
                cost = slots[key] = self._count(spec)
            flops += cost[0]
            params += cost[1]
        return flops, params
