"""The supernet: every subnet it runs is the static network that `extract` cuts out."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from hwnas import Arch, SearchSpace, spaces
from hwnas.blocks import InvertedResidual, se_channels
from hwnas.errors import ArchError, DataError
from hwnas.supernet import Supernet, recalibrate_bn
from hwnas.supernet.ops import DynamicBatchNorm2d, DynamicConv2d, DynamicInvertedResidual

TOL = 1e-5


def at_resolution(arch: Arch, resolution: int) -> Arch:
    return dataclasses.replace(arch, resolution=resolution)


def prepared(space: SearchSpace, seed: int, kernel_transform: bool = False) -> Supernet:
    """A supernet that looks trained: BN affine weights and statistics away from their init, logits O(1).

    At init every BN is the identity in eval mode and residual blocks could hide wrong weights,
    so the equality tests would prove little; here every layer matters to the output.
    """
    torch.manual_seed(seed)
    net = Supernet(space, kernel_transform=kernel_transform, zero_last_gamma=False)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        classifier = net.head.classifier
        classifier.weight.normal_(0.0, classifier.in_features**-0.5)
        for m in net.modules():
            if isinstance(m, DynamicConv2d) and m.kernel_transform:
                for matrix in m.transforms.values():
                    matrix.add_(torch.randn_like(matrix) * 0.1)
    largest = space.largest()
    recalibrate_bn(net.set_active(largest), [torch.randn(4, *space.input_shape(largest))])
    with torch.no_grad():
        for index, m in enumerate(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            m.num_batches_tracked.fill_(7 + index)
    return net.eval()


@pytest.fixture(scope="module")
def space32() -> SearchSpace:
    return spaces.get("mbv3-32")


@pytest.fixture(scope="module")
def net32(space32: SearchSpace) -> Supernet:
    return prepared(space32, seed=0)


@pytest.fixture(scope="module")
def net224() -> Supernet:
    return prepared(spaces.get("mbv3-224"), seed=1)


def assert_extract_matches(net: Supernet, arch: Arch, seed: int) -> None:
    """Equal to float tolerance: within TOL, or within a few times the static net's own fp32 error.

    The supernet's depthwise convs may sum in another order than `nn.Conv2d` (hwnas.depthwise),
    and a deep net with large outputs (the largest arch reaches about 80) amplifies rounding: there
    the static net in fp32 is itself 1e-3 off its fp64 twin. A wrong weight or padding is off by
    the output's own scale.
    """
    x = torch.randn(2, *net.space.input_shape(arch), generator=torch.Generator().manual_seed(seed))
    static = net.extract(arch).eval()
    with torch.no_grad():
        expected = net.set_active(arch)(x)
        got = static(x)
    assert got.shape == (2, net.space.num_classes)
    assert expected.std() > 1e-3, "outputs this small would make the tolerance meaningless"
    diff = (got - expected).abs().max().item()
    if diff <= TOL:
        return
    with torch.no_grad():
        exact = copy.deepcopy(static).double()(x.double())
    rounding = (got.double() - exact).abs().max().item()
    assert diff <= 8 * rounding, (f"{arch.to_json()}: max abs diff {diff}, beyond 8x the static net's own fp32 "
                                  f"error {rounding} (outputs up to {exact.abs().max().item():.3g})")


def test_extract_equals_supernet_mbv3_32(net32: Supernet, space32: SearchSpace) -> None:
    rng = np.random.default_rng(0)
    archs = [space32.smallest(), space32.largest()] + [space32.sample(rng) for _ in range(50)]
    assert len({a.arch_id for a in archs}) == len(archs)
    for seed, arch in enumerate(archs):
        assert_extract_matches(net32, arch, seed)


def test_extract_equals_supernet_mbv3_224(net224: Supernet) -> None:
    space = net224.space
    rng = np.random.default_rng(1)
    low = min(space.resolution_choices)
    sampled = [space.sample(rng) for _ in range(5)]
    archs = [space.smallest(), space.largest(), at_resolution(sampled[0], 224)]
    archs += [at_resolution(a, low) for a in sampled[1:]]
    assert any(a.resolution == 224 and a != space.largest() for a in archs)
    for seed, arch in enumerate(archs):
        assert_extract_matches(net224, arch, seed)


def test_extract_equals_supernet_with_kernel_transform(space32: SearchSpace) -> None:
    net = prepared(space32, seed=2, kernel_transform=True)
    conv = net.block(0, 0).dw_conv
    assert not torch.allclose(conv.transforms["7to5"], torch.eye(25)), "the transforms must be perturbed"
    n = sum(space32.largest().depths)
    archs = [dataclasses.replace(space32.largest(), kernels=(k,) * n) for k in (3, 5)]
    archs += [space32.sample(seed) for seed in range(4)]
    for seed, arch in enumerate(archs):
        assert_extract_matches(net, arch, seed)


def test_kernel_transform_chains_the_learned_maps() -> None:
    torch.manual_seed(0)
    conv = DynamicConv2d(4, 4, (3, 5, 7), depthwise=True, kernel_transform=True)
    assert torch.equal(conv.active_kernel(3), conv.weight[:, :, 2:5, 2:5]), "identity maps start as the crop"
    with torch.no_grad():
        for matrix in conv.transforms.values():
            matrix.add_(torch.randn_like(matrix) * 0.1)
    m75, m53 = conv.transforms["7to5"], conv.transforms["5to3"]
    k5 = (conv.weight[:, :, 1:6, 1:6].reshape(4, 1, 25) @ m75.T).reshape(4, 1, 5, 5)
    k3 = (k5[:, :, 1:4, 1:4].reshape(4, 1, 9) @ m53.T).reshape(4, 1, 3, 3)
    torch.testing.assert_close(conv.active_kernel(5), k5)
    torch.testing.assert_close(conv.active_kernel(3), k3)
    assert torch.equal(conv.active_kernel(7), conv.weight)
    conv.active_kernel(3).sum().backward()
    assert m75.grad is not None and m53.grad is not None and m53.grad.abs().sum() > 0


def test_extracted_net_is_plain_torch_and_independent(net32: Supernet, space32: SearchSpace) -> None:
    arch = space32.sample(3)
    sub = net32.extract(arch)
    assert isinstance(sub, nn.Sequential)
    assert len(sub) == len(space32.blocks(arch))
    leaves = [m for m in sub.modules() if not list(m.children())]
    assert leaves and all(type(m).__module__.startswith("torch.nn") for m in leaves), \
        {type(m).__module__ for m in leaves}
    assert not sub.training, "extract follows the supernet's mode"
    supernet_storage = {t.untyped_storage().data_ptr() for t in [*net32.parameters(), *net32.buffers()]}
    assert all(t.untyped_storage().data_ptr() not in supernet_storage for t in [*sub.parameters(), *sub.buffers()])
    x = torch.randn(2, *space32.input_shape(arch))
    with torch.no_grad():
        before = net32.set_active(arch)(x)
        for p in sub.parameters():
            p.add_(1.0)
        after = net32(x)
    assert torch.equal(before, after)


def test_extract_copies_running_stats_and_batch_counts(net32: Supernet, space32: SearchSpace) -> None:
    arch = space32.sample(4)
    sub = net32.extract(arch)
    block = sub[2]
    source = net32.block(0, 0)
    hidden = block.depthwise[1].num_features
    assert hidden < source.dw_bn.num_features or arch.expands[0] == max(space32.expand_choices)
    assert torch.equal(block.depthwise[1].running_var, source.dw_bn.running_var[:hidden])
    assert torch.equal(block.depthwise[1].num_batches_tracked, source.dw_bn.num_batches_tracked)
    assert int(source.dw_bn.num_batches_tracked) != 1


def test_set_active_validates_and_returns_self(net32: Supernet, space32: SearchSpace) -> None:
    arch = space32.sample(5)
    assert net32.set_active(arch) is net32
    assert net32.active_arch == arch
    other = spaces.get("mbv3-224").smallest()
    with pytest.raises(ArchError, match="mbv3-224"):
        net32.set_active(other)
    assert net32.active_arch == arch
    with pytest.raises(ArchError, match="kernels"):
        net32.extract(dataclasses.replace(arch, kernels=arch.kernels[:-1]))


def test_config_rebuilds_the_same_module(net32: Supernet) -> None:
    config = net32.config()
    assert config["kernel_transform"] is False
    rebuilt = Supernet(SearchSpace.from_dict(config["space"]), kernel_transform=config["kernel_transform"])
    rebuilt.load_state_dict(net32.state_dict())
    arch = net32.space.sample(6)
    x = torch.randn(2, *net32.space.input_shape(arch))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().set_active(arch)(x), net32.set_active(arch)(x), rtol=0, atol=0)


def test_training_step_reaches_only_the_active_weights(space32: SearchSpace) -> None:
    net = Supernet(space32)
    arch = space32.smallest()
    loss = net.set_active(arch)(torch.randn(2, *space32.input_shape(arch))).square().mean()
    loss.backward()
    active, skipped = net.block(1, 0), net.block(1, arch.depths[1])
    assert active.dw_conv.weight.grad is not None and active.dw_conv.weight.grad.abs().sum() > 0
    hidden = space32.hidden_channels(active.cin, arch.expands[0])
    assert active.dw_conv.weight.grad[hidden:].abs().sum() == 0, "channels beyond the active width get no gradient"
    assert skipped.dw_conv.weight.grad is None


def test_zero_last_gamma_makes_residual_blocks_start_as_identity(space32: SearchSpace) -> None:
    net = Supernet(space32)
    residual = [b for blocks in net.stages for b in blocks if b.residual]
    assert residual and all(b.project_bn.weight.abs().sum() == 0 for b in residual)
    assert all(b.project_bn.weight.abs().sum() > 0 for blocks in net.stages for b in blocks if not b.residual)


def test_dynamic_batchnorm_updates_only_the_active_channels() -> None:
    torch.manual_seed(0)
    dynamic, static = DynamicBatchNorm2d(8, momentum=0.3), nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        dynamic.weight.uniform_(0.5, 1.5)
        static.weight.copy_(dynamic.weight[:5])
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(dynamic(x), static(x))
    torch.testing.assert_close(dynamic.running_mean[:5], static.running_mean)
    torch.testing.assert_close(dynamic.running_var[:5], static.running_var)
    assert torch.equal(dynamic.running_mean[5:], torch.zeros(3))
    assert torch.equal(dynamic.running_var[5:], torch.ones(3))
    assert int(dynamic.num_batches_tracked) == 1


def _bn_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


def test_recalibration_resets_and_reestimates_statistics(net32: Supernet, space32: SearchSpace) -> None:
    arch = space32.sample(7)
    sub = net32.extract(arch)
    before = _bn_buffers(sub)
    momenta = [m.momentum for m in sub.modules() if isinstance(m, nn.BatchNorm2d)]
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, *space32.input_shape(arch), generator=generator), torch.zeros(4)) for _ in range(5)]
    assert recalibrate_bn(sub, batches, max_batches=3) is sub
    after = _bn_buffers(sub)
    # Running means right after a BN-conv pair are data independent (the BN's batch mean is its bias),
    # but every running variance depends on the data.
    assert all(not torch.allclose(a, b) for a, b in zip(before[1::2], after[1::2], strict=True))
    norms = [m for m in sub.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.momentum for m in norms] == momenta
    assert all(int(m.num_batches_tracked) == 3 for m in norms)
    assert not sub.training
    # The stem BN's running mean is the exact average of the three batch means.
    stem_out = torch.cat([sub[0][0](x) for x, _ in batches[:3]])
    torch.testing.assert_close(sub[0][1].running_mean, stem_out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError):
        recalibrate_bn(sub, [])


def test_recalibrated_subnet_equals_recalibrated_supernet_path(net32: Supernet, space32: SearchSpace) -> None:
    supernet = copy.deepcopy(net32).train()
    arch = space32.sample(8)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, *space32.input_shape(arch), generator=generator) for _ in range(3)]
    sub = recalibrate_bn(supernet.extract(arch), batches)
    recalibrate_bn(supernet.set_active(arch), batches)
    assert supernet.training and sub.training, "recalibration restores the training flag"
    supernet.eval()
    for a, b in zip(_bn_buffers(sub), _bn_buffers(supernet.extract(arch)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    x = torch.randn(2, *space32.input_shape(arch), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(sub.eval()(x), supernet(x), rtol=1e-4, atol=1e-5)


def test_sort_channels_keeps_the_largest_subnet(net32: Supernet, space32: SearchSpace) -> None:
    supernet = copy.deepcopy(net32)
    largest, small = space32.largest(), dataclasses.replace(space32.largest(), expands=(3,) * 16)
    x = torch.randn(2, *space32.input_shape(largest))
    with torch.no_grad():
        big_before, small_before = supernet.set_active(largest)(x), supernet.set_active(small)(x)
        supernet.sort_channels()
        big_after, small_after = supernet.set_active(largest)(x), supernet.set_active(small)(x)
    # Permuted channels are summed in another order: float32 rounding differs at the 1e-5 level of the logits'
    # scale (a wrong permutation differs at the 1e-1 level).
    scale = big_before.abs().max().item()
    torch.testing.assert_close(big_after, big_before, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    assert (small_after - small_before).abs().max() > 1e-3, "narrower subnets now run other channels"
    for block in (b for blocks in supernet.stages for b in blocks):
        assert isinstance(block, DynamicInvertedResidual)
        importance = block.project_conv.weight.abs().sum(dim=(0, 2, 3))
        assert torch.all(importance[:-1] >= importance[1:])
    assert_extract_matches(supernet, small, seed=9)


def test_block_skips_the_expansion_when_hidden_equals_input() -> None:
    torch.manual_seed(0)
    dynamic = DynamicInvertedResidual(16, 16, (16, 32), (3, 5), stride=1, act="hswish", se_ratio=0.25)
    with torch.no_grad():
        for m in dynamic.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    dynamic.eval()
    x = torch.randn(2, 16, 8, 8)
    for hidden, kernel in ((16, 3), (32, 5)):
        static = InvertedResidual(16, 16, hidden, kernel, 1, "hswish", se_channels(hidden, 0.25))
        dynamic.copy_active_to(static)
        assert (static.expand is None) == (hidden == 16)
        with torch.no_grad():
            torch.testing.assert_close(static.eval()(x), dynamic(x, kernel, hidden), rtol=0, atol=TOL)
    assert dynamic.sort_hidden_channels() is False, "the hidden channels of width 16 are the block's input"
