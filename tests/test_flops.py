"""FLOPs and parameter counts: block sums agree with whole networks and follow every elastic dimension."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from hwnas import Arch, SearchSpace, spaces
from hwnas.blocks import build_block, build_network
from hwnas.flops import arch_flops, arch_params, block_flops, block_params, model_flops


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return spaces.get("mbv3-32")


def test_model_flops_counts_two_per_multiply_add() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).train()
    assert model_flops(conv, (3, 8, 8), batch_size=2) == 2 * 2 * (8 * 8) * 8 * 3 * 9
    assert conv.training, "the module's mode is restored"


def test_block_flops_and_params_equal_the_built_block(space: SearchSpace) -> None:
    specs = space.blocks(space.sample(0))
    for spec in (specs[0], specs[1], specs[2], specs[-2], specs[-1]):
        block = build_block(spec, space.se_ratio)
        assert block_flops(spec, space.se_ratio) == model_flops(block, (spec.cin, spec.in_size, spec.in_size))
        assert block_params(spec, space.se_ratio) == sum(p.numel() for p in block.parameters())
        assert block_flops(spec, space.se_ratio) > 0


@pytest.mark.parametrize("name", ["mbv3-32", "mbv3-224"])
def test_arch_flops_equal_the_whole_network(name: str) -> None:
    space = spaces.get(name)
    archs = [space.smallest(), space.sample(1)] + ([space.largest(), space.sample(2)] if name == "mbv3-32" else [])
    for arch in archs:
        net = build_network(space.blocks(arch), space.se_ratio, space.dropout)
        assert arch_flops(space, arch) == model_flops(net, space.input_shape(arch))
        assert arch_params(space, arch) == sum(p.numel() for p in net.parameters())


def _variants(space: SearchSpace, base: Arch) -> list[tuple[str, Arch]]:
    """`base` grown along one elastic dimension at a time: each stage's depth, each block's kernel and expand."""
    grown = []
    for stage, sl in enumerate(base.stage_slices()):
        depth = base.depths[stage]
        bigger = [d for d in space.depth_choices if d > depth]
        if bigger:
            extra = bigger[0] - depth
            kernels = base.kernels[:sl.stop] + (base.kernels[sl.stop - 1],) * extra + base.kernels[sl.stop:]
            expands = base.expands[:sl.stop] + (base.expands[sl.stop - 1],) * extra + base.expands[sl.stop:]
            depths = base.depths[:stage] + (bigger[0],) + base.depths[stage + 1:]
            grown.append((f"depth[{stage}]", dataclasses.replace(base, depths=depths, kernels=kernels,
                                                                 expands=expands)))
    for index in range(len(base.kernels)):
        for field, choices in (("kernels", space.kernel_choices), ("expands", space.expand_choices)):
            values = getattr(base, field)
            for choice in (c for c in choices if c > values[index]):
                changed = values[:index] + (choice,) + values[index + 1:]
                grown.append((f"{field}[{index}]={choice}", dataclasses.replace(base, **{field: changed})))
    return grown


def test_flops_grow_with_every_elastic_dimension(space: SearchSpace) -> None:
    resolutions = sorted(space.resolution_choices)
    by_resolution = [arch_flops(space, dataclasses.replace(space.smallest(), resolution=r)) for r in resolutions]
    assert all(a < b for a, b in zip(by_resolution, by_resolution[1:], strict=False)), by_resolution
    base = space.smallest()
    variants = _variants(space, base)
    assert len(variants) == space.num_stages + sum(base.depths) * 4
    for what, arch in variants:
        assert arch_flops(space, arch) > arch_flops(space, base), what


def test_params_grow_with_depth_kernel_expand_but_not_resolution(space: SearchSpace) -> None:
    base = space.smallest()
    counts = {arch_params(space, dataclasses.replace(base, resolution=r)) for r in space.resolution_choices}
    assert counts == {arch_params(space, base)}
    for what, arch in _variants(space, base):
        assert arch_params(space, arch) > arch_params(space, base), what


def test_sampled_archs_lie_between_smallest_and_largest(space: SearchSpace) -> None:
    archs = [space.sample(seed) for seed in range(50)]
    flops = [arch_flops(space, a) for a in archs]
    smallest, largest = arch_flops(space, space.smallest()), arch_flops(space, space.largest())
    assert all(smallest <= f <= largest for f in flops)
