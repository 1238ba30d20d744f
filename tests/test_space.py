"""Search spaces: archs round-trip, validation names what is wrong, variation stays in the space."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from hwnas import Arch, SearchSpace, StageSpec, spaces
from hwnas.errors import ArchError


@pytest.fixture(scope="module", params=["mbv3-32", "mbv3-224"])
def space(request: pytest.FixtureRequest) -> SearchSpace:
    return spaces.get(request.param)


def tiny_space() -> SearchSpace:
    return SearchSpace(
        name="tiny", in_channels=3, num_classes=4, stem_channels=8, stem_stride=1, stem_act="relu",
        first_channels=8, stages=(StageSpec(16, stride=2), StageSpec(24, stride=1, act="hswish", se=True)),
        final_expand_channels=32, feature_channels=64, head_act="hswish",
        kernel_choices=(3, 5), expand_choices=(3, 6), depth_choices=(1, 2), resolution_choices=(16, 32),
    )


def test_arch_json_round_trip(space: SearchSpace, tmp_path: Path) -> None:
    for seed in range(20):
        arch = space.sample(seed)
        assert Arch.from_json(arch.to_json()) == arch
        assert Arch.parse(arch.to_json()) == arch
        assert space.arch_from_dict(json.loads(arch.to_json())) == arch
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"arch": arch.to_dict(), "latency_ms": 1.0}))
    assert Arch.from_file(path) == arch
    assert Arch.parse(str(path)) == arch


def test_arch_id_is_stable() -> None:
    space = spaces.get("mbv3-32")
    # A golden value: ids name cached evaluations and result rows, so they must not drift between versions.
    assert space.smallest().arch_id == "8aa8e47f7a20"
    arch = space.sample(3)
    same = Arch(arch.space, arch.resolution, list(arch.depths), list(arch.kernels),
                [float(e) for e in arch.expands])
    assert same == arch and hash(same) == hash(arch) and same.arch_id == arch.arch_id
    ids = {space.sample(seed).arch_id for seed in range(200)}
    assert len(ids) == len({space.sample(seed) for seed in range(200)})


def test_space_spec_round_trip(space: SearchSpace) -> None:
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space


def test_validate_names_the_field_and_the_choices() -> None:
    space = spaces.get("mbv3-32")
    arch = space.sample(0)
    n = sum(arch.depths)
    cases = [
        (spaces.get("mbv3-224").smallest(), r"'mbv3-224', not 'mbv3-32'"),
        (dataclasses.replace(arch, resolution=64), r"resolution 64 .*\[24, 28, 32\]"),
        (dataclasses.replace(arch, depths=arch.depths[:-1]), r"depths has 3 entries; .* 4 stages"),
        (dataclasses.replace(arch, depths=(5,) + arch.depths[1:]), r"depths\[0\] = 5 .*\[2, 3, 4\]"),
        (dataclasses.replace(arch, kernels=arch.kernels[:-1]), rf"kernels has {n - 1} entries.*need {n}"),
        (dataclasses.replace(arch, kernels=arch.kernels[:2] + (4,) + arch.kernels[3:]),
         r"kernels\[2\] = 4 .*\[3, 5, 7\]"),
        (dataclasses.replace(arch, expands=(2,) + arch.expands[1:]), r"expands\[0\] = 2 .*\[3, 4, 6\]"),
    ]
    for bad, message in cases:
        with pytest.raises(ArchError, match=message):
            space.validate(bad)
    with pytest.raises(ArchError, match="missing field"):
        Arch.from_dict({"space": "mbv3-32", "resolution": 32})
    with pytest.raises(ArchError, match="not valid JSON"):
        Arch.from_json("{nope")


def test_mutate_returns_a_different_valid_arch(space: SearchSpace) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        parent = space.sample(rng)
        child = space.mutate(parent, rng)
        assert child != parent
        assert space.validate(child) is child


def test_crossover_takes_each_gene_from_a_parent(space: SearchSpace) -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = space.sample(rng), space.sample(rng)
        child = space.validate(space.crossover(a, b, rng))
        assert child.resolution in (a.resolution, b.resolution)
        assert all(d in (x, y) for d, x, y in zip(child.depths, a.depths, b.depths, strict=True))
        blocks = {arch: {(s, i): (k, e) for s, i, k, e in space.iter_stage_blocks(arch)} for arch in (a, b, child)}
        for slot, gene in blocks[child].items():
            if slot in blocks[a] and slot in blocks[b]:
                assert gene in (blocks[a][slot], blocks[b][slot])
        assert space.crossover(a, a, rng) == a


def test_size_equals_a_brute_force_count() -> None:
    space = tiny_space()
    every = set()
    per_block = list(itertools.product(space.kernel_choices, space.expand_choices))
    for resolution in space.resolution_choices:
        for depths in itertools.product(space.depth_choices, repeat=space.num_stages):
            for blocks in itertools.product(per_block, repeat=sum(depths)):
                kernels = tuple(k for k, _ in blocks)
                expands = tuple(e for _, e in blocks)
                every.add(space.validate(Arch("tiny", resolution, depths, kernels, expands)))
    assert space.size() == len(every) == 2 * (4 + 16) ** 2
    assert {space.sample(seed) for seed in range(300)} <= every


def test_encode_is_injective_and_sized(space: SearchSpace) -> None:
    archs = {space.sample(seed) for seed in range(300)} | {space.smallest(), space.largest()}
    codes = {arch: space.encode(arch) for arch in archs}
    assert all(c.shape == (space.encoding_size,) and set(np.unique(c)) <= {0.0, 1.0} for c in codes.values())
    assert len({c.tobytes() for c in codes.values()}) == len(archs)


def test_blocks_chain_and_all_blocks_cover_them(space: SearchSpace) -> None:
    catalogue = {spec.key for spec in space.all_blocks()}
    assert len(catalogue) == len(space.all_blocks())
    rng = np.random.default_rng(2)
    for arch in [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(200)]:
        specs = space.blocks(arch)
        assert [s.kind for s in specs[:2]] == ["stem", "first"] and specs[-1].kind == "head"
        assert len(specs) == sum(arch.depths) + 3
        assert all(a.out_size == b.in_size and a.cout == b.cin for a, b in zip(specs, specs[1:], strict=False))
        missing = {spec.key for spec in specs} - catalogue
        assert not missing, missing
