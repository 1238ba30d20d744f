"""Search spaces of MobileNetV3-style networks: `BlockSpec`, `SlotSpecs`, `SearchSpace` (and `Arch`, from `hwnas.arch`).

A space is declarative (stem, stages, head, and the elastic choices); everything else in hwnas
(supernet, latency tables, searchers, exporters) reads the same `BlockSpec`s from it, so the LUT
key of a block names exactly the module that the exported network runs.

One invariant carries the fast paths: a block's spec depends only on the resolution, its stage,
its index in the stage and its own kernel and expand ratio (every stage keeps at least one block,
so the sizes a stage sees do not depend on the depths of the others). `SearchSpace.slot_specs`
is the one place that derives it; `blocks(arch)`, `all_blocks()`, the latency table's keys and
range, the searchers' gene-row pricing and the FLOPs counts all read it from there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hwnas.arch import Arch
from hwnas.errors import ArchError

if TYPE_CHECKING:
    from hwnas.genes import GeneCodec

__all__ = ["ACTIVATIONS", "Arch", "BlockSpec", "RngLike", "SearchSpace", "SlotSpecs", "StageSpec", "as_rng",
           "make_divisible"]

RngLike = np.random.Generator | int | None

ACTIVATIONS = ("relu", "hswish")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels the way MobileNetV3 does, so hidden widths stay hardware friendly."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def as_rng(rng: RngLike) -> np.random.Generator:
    """Accept a Generator or a seed, so that callers can pass either."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


@dataclass(frozen=True)
class BlockSpec:
    """One concrete block as it runs: its `key` is the latency-table row key.

    kind: "stem" (conv-bn-act), "first" (MobileNetV3's fixed depthwise-separable block),
    "mbconv" (inverted residual), or "head" (1x1 conv, pooling, feature and classifier layers).
    """

    kind: str
    in_size: int
    cin: int
    cout: int
    kernel: int = 1
    expand: float = 1
    stride: int = 1
    act: str = "relu"
    se: bool = False
    hidden: int = 0  # mbconv: expanded channels; head: channels of the last 1x1 conv before pooling
    feature: int = 0  # head: width of the feature layer after pooling

    @property
    def out_size(self) -> int:
        return (self.in_size - 1) // self.stride + 1

    @property
    def key(self) -> str:
        """Readable and stable, e.g. `mbconv_i24x28_o40_k5_e4_h96_s2_hswish_se`."""
        head = f"{self.kind}_i{self.cin}x{self.in_size}"
        if self.kind == "head":
            return f"{head}_h{self.hidden}_f{self.feature}_o{self.cout}_{self.act}"
        if self.kind == "mbconv":
            se = "_se" if self.se else ""
            return (f"{head}_o{self.cout}_k{self.kernel}_e{self.expand:g}_h{self.hidden}"
                    f"_s{self.stride}_{self.act}{se}")
        return f"{head}_o{self.cout}_k{self.kernel}_s{self.stride}_{self.act}"

    @property
    def residual(self) -> bool:
        return self.kind in ("mbconv", "first") and self.stride == 1 and self.cin == self.cout

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StageSpec:
    """One elastic stage: up to max(depth_choices) inverted-residual blocks of one width."""

    out_channels: int
    stride: int
    act: str = "relu"
    se: bool = False


Slot = tuple[int, int, int, float]  # (stage, index in the stage, kernel, expand)


@dataclass(frozen=True)
class SlotSpecs:
    """Every block an arch of one resolution can hold: the fixed ones and one spec per slot choice.

    `mbconv[(stage, index, kernel, expand)]` is the inverted residual in that slot with those
    choices; an arch of this resolution is `stem, first, its active slots in order, head`.
    """

    resolution: int
    stem: BlockSpec
    first: BlockSpec
    head: BlockSpec
    mbconv: Mapping[Slot, BlockSpec]

    @property
    def fixed(self) -> tuple[BlockSpec, BlockSpec, BlockSpec]:
        """The blocks every arch of this resolution has: stem, first block, head."""
        return self.stem, self.first, self.head


@dataclass(frozen=True)
class SearchSpace:
    """The choices of a MobileNetV3-style space and the operations a searcher needs on them."""

    name: str
    in_channels: int
    num_classes: int
    stem_channels: int
    stem_stride: int
    stem_act: str
    first_channels: int
    stages: tuple[StageSpec, ...]
    final_expand_channels: int
    feature_channels: int
    head_act: str
    kernel_choices: tuple[int, ...]
    expand_choices: tuple[float, ...]
    depth_choices: tuple[int, ...]
    resolution_choices: tuple[int, ...]
    se_ratio: float = 0.25
    dropout: float = 0.0
    description: str = ""
    _cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)  # derived, never saved

    # ---- the spec, for checkpoints and tables -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "_cache"}
        data["stages"] = tuple(asdict(stage) for stage in self.stages)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """A spec read back from a file; a field of the wrong kind is a ValueError naming it, not a later crash."""
        data = dict(data)
        data["stages"] = tuple(StageSpec(**s) for s in data["stages"])
        for key in ("kernel_choices", "expand_choices", "depth_choices", "resolution_choices"):
            data[key] = tuple(data[key])
            kinds = (int, float) if key == "expand_choices" else (int,)
            if not data[key] or not all(isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in data[key]):
                raise ValueError(f"{key} must be a non-empty list of positive numbers, got {list(data[key])}")
        ints = ["in_channels", "num_classes", "stem_channels", "stem_stride", "first_channels",
                "final_expand_channels", "feature_channels"]
        for where, value in [*((k, data.get(k)) for k in ints),
                             *((f"stages[{i}].{k}", getattr(st, k)) for i, st in enumerate(data["stages"])
                               for k in ("out_channels", "stride"))]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where} must be a positive integer, got {value!r}")
        return cls(**data)

    # ---- structure -----------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def max_depth(self) -> int:
        return max(self.depth_choices)

    def stage_in_channels(self, stage: int) -> int:
        return self.first_channels if stage == 0 else self.stages[stage - 1].out_channels

    def block_in_channels(self, stage: int, index: int) -> int:
        """Input channels of block `index` of `stage` (only the first block changes width)."""
        return self.stage_in_channels(stage) if index == 0 else self.stages[stage].out_channels

    def hidden_channels(self, cin: int, expand: float) -> int:
        return make_divisible(cin * expand)

    def se_channels(self, hidden: int) -> int:
        return make_divisible(hidden * self.se_ratio)

    def input_shape(self, arch: Arch) -> tuple[int, int, int]:
        self.validate(arch)
        return (self.in_channels, arch.resolution, arch.resolution)

    def slot_specs(self, resolution: int) -> SlotSpecs:
        """The blocks of every arch at `resolution`, derived once and cached (see the module doc)."""
        key = ("slot_specs", resolution)
        if key not in self._cache:
            if resolution not in self.resolution_choices:
                raise ArchError(f"resolution {resolution} is not allowed; choices: {list(self.resolution_choices)}")
            stem = BlockSpec("stem", resolution, self.in_channels, self.stem_channels, kernel=3,
                             stride=self.stem_stride, act=self.stem_act)
            size = stem.out_size
            first = BlockSpec("first", size, self.stem_channels, self.first_channels, kernel=3, act="relu")
            mbconv: dict[Slot, BlockSpec] = {}
            for stage_index, stage in enumerate(self.stages):
                out_size = (size - 1) // stage.stride + 1
                for index in range(self.max_depth):
                    cin = self.block_in_channels(stage_index, index)
                    for kernel in self.kernel_choices:
                        for expand in self.expand_choices:
                            mbconv[(stage_index, index, kernel, expand)] = BlockSpec(
                                "mbconv", size if index == 0 else out_size, cin, stage.out_channels, kernel=kernel,
                                expand=expand, stride=stage.stride if index == 0 else 1, act=stage.act, se=stage.se,
                                hidden=self.hidden_channels(cin, expand))
                size = out_size
            head = BlockSpec("head", size, self.stages[-1].out_channels, self.num_classes, act=self.head_act,
                             hidden=self.final_expand_channels, feature=self.feature_channels)
            self._cache[key] = SlotSpecs(resolution, stem, first, head, mbconv)
        spec: SlotSpecs = self._cache[key]
        return spec

    def blocks(self, arch: Arch) -> list[BlockSpec]:
        """The concrete blocks of `arch`, stem to head, with the input size each one sees."""
        self.validate(arch)
        specs = self.slot_specs(arch.resolution)
        return [specs.stem, specs.first, *(specs.mbconv[slot] for slot in self.iter_stage_blocks(arch)), specs.head]

    def all_blocks(self) -> list[BlockSpec]:
        """Every unique block that some arch of the space contains: what a profiler must time."""
        seen: dict[str, BlockSpec] = {}
        for resolution in self.resolution_choices:
            specs = self.slot_specs(resolution)
            for spec in (specs.stem, specs.first, *specs.mbconv.values(), specs.head):
                seen.setdefault(spec.key, spec)
        return list(seen.values())

    # ---- validity --------------------------------------------------------------------------------
    def validate(self, arch: Arch) -> Arch:
        """Refuse an arch that is not of this space, naming the bad field and the allowed values."""
        if not isinstance(arch, Arch):
            raise ArchError(f"expected an Arch, got {type(arch).__name__}")
        if arch.space != self.name:
            raise ArchError(f"arch belongs to space '{arch.space}', not '{self.name}'")
        if arch.resolution not in self.resolution_choices:
            raise ArchError(f"resolution {arch.resolution} is not allowed; choices: {list(self.resolution_choices)}")
        if len(arch.depths) != self.num_stages:
            raise ArchError(f"depths has {len(arch.depths)} entries; space '{self.name}' has {self.num_stages} stages")
        for stage, depth in enumerate(arch.depths):
            if depth not in self.depth_choices:
                raise ArchError(f"depths[{stage}] = {depth} is not allowed; choices: {list(self.depth_choices)}")
        total = sum(arch.depths)
        for name, values, choices in (("kernels", arch.kernels, self.kernel_choices),
                                      ("expands", arch.expands, self.expand_choices)):
            if len(values) != total:
                raise ArchError(f"{name} has {len(values)} entries; sum(depths) = {total} blocks need {total}")
            for index, value in enumerate(values):
                if value not in choices:
                    raise ArchError(f"{name}[{index}] = {value} is not allowed; choices: {list(choices)}")
        return arch

    def arch_from_dict(self, data: Mapping[str, Any]) -> Arch:
        return self.validate(Arch.from_dict(data))

    # ---- sampling and variation --------------------------------------------------------------------
    def _make(self, resolution: int, genes: Sequence[tuple[int, Sequence[tuple[int, float]]]]) -> Arch:
        """Build an arch from padded per-stage genes: (depth, [(kernel, expand)] * max_depth)."""
        depths, kernels, expands = [], [], []
        for depth, blocks in genes:
            depths.append(depth)
            for kernel, expand in blocks[:depth]:
                kernels.append(kernel)
                expands.append(expand)
        return Arch(self.name, resolution, tuple(depths), tuple(kernels), tuple(expands))

    def _genes(self, arch: Arch, rng: np.random.Generator) -> list[tuple[int, list[tuple[int, float]]]]:
        """Padded genes of `arch`; inactive slots get random choices (they do not affect the net)."""
        genes = []
        for depth, sl in zip(arch.depths, arch.stage_slices(), strict=True):
            blocks = list(zip(arch.kernels[sl], arch.expands[sl], strict=True))
            while len(blocks) < self.max_depth:
                blocks.append(self._random_block(rng))
            genes.append((depth, blocks))
        return genes

    def _random_block(self, rng: np.random.Generator) -> tuple[int, float]:
        return (self.kernel_choices[rng.integers(len(self.kernel_choices))],
                self.expand_choices[rng.integers(len(self.expand_choices))])

    def _mutate_block(self, block: tuple[int, float], rng: np.random.Generator, prob: float) -> tuple[int, float]:
        kernel, expand = block
        if rng.random() < prob:
            kernel = self.kernel_choices[rng.integers(len(self.kernel_choices))]
        if rng.random() < prob:
            expand = self.expand_choices[rng.integers(len(self.expand_choices))]
        return kernel, expand

    def sample(self, rng: RngLike = None) -> Arch:
        """Each choice uniformly and independently, as Once-for-All samples subnets."""
        rng = as_rng(rng)
        resolution = self.resolution_choices[rng.integers(len(self.resolution_choices))]
        genes = []
        for _ in self.stages:
            depth = self.depth_choices[rng.integers(len(self.depth_choices))]
            genes.append((depth, [self._random_block(rng) for _ in range(self.max_depth)]))
        return self._make(resolution, genes)

    def mutate(self, arch: Arch, rng: RngLike = None, prob: float = 0.1) -> Arch:
        """Resample each choice with probability `prob`; always returns a different arch."""
        rng = as_rng(rng)
        self.validate(arch)
        for _ in range(100):
            resolution = arch.resolution
            if rng.random() < prob:
                resolution = self.resolution_choices[rng.integers(len(self.resolution_choices))]
            genes = []
            for depth, blocks in self._genes(arch, rng):
                if rng.random() < prob:
                    depth = self.depth_choices[rng.integers(len(self.depth_choices))]
                blocks = [self._mutate_block(block, rng, prob) for block in blocks]
                genes.append((depth, blocks))
            child = self._make(resolution, genes)
            if child != arch:
                return child
            prob = min(1.0, max(prob, 0.05) * 2)
        return self.sample(rng)

    def crossover(self, a: Arch, b: Arch, rng: RngLike = None) -> Arch:
        """Each choice from either parent with equal probability (uniform crossover)."""
        rng = as_rng(rng)
        self.validate(a)
        self.validate(b)
        resolution = a.resolution if rng.random() < 0.5 else b.resolution
        genes = []
        for (da, ba), (db, bb) in zip(self._genes(a, rng), self._genes(b, rng), strict=True):
            depth = da if rng.random() < 0.5 else db
            blocks = [(x if rng.random() < 0.5 else y) for x, y in zip(ba, bb, strict=True)]
            genes.append((depth, blocks))
        return self._make(resolution, genes)

    def smallest(self) -> Arch:
        return self._uniform(min(self.resolution_choices), min(self.depth_choices),
                             min(self.kernel_choices), min(self.expand_choices))

    def largest(self) -> Arch:
        return self._uniform(max(self.resolution_choices), max(self.depth_choices),
                             max(self.kernel_choices), max(self.expand_choices))

    def _uniform(self, resolution: int, depth: int, kernel: int, expand: float) -> Arch:
        n = depth * self.num_stages
        return Arch(self.name, resolution, (depth,) * self.num_stages, (kernel,) * n, (expand,) * n)

    def iter_stage_blocks(self, arch: Arch) -> Iterator[tuple[int, int, int, float]]:
        """(stage, index, kernel, expand) for each active block."""
        for stage, sl in enumerate(arch.stage_slices()):
            for index, (kernel, expand) in enumerate(zip(arch.kernels[sl], arch.expands[sl], strict=True)):
                yield stage, index, kernel, expand

    # ---- features and size ---------------------------------------------------------------------------
    @property
    def encoding_size(self) -> int:
        per_slot = len(self.kernel_choices) + len(self.expand_choices)
        return (len(self.resolution_choices) + self.num_stages * len(self.depth_choices)
                + self.num_stages * self.max_depth * per_slot)

    def encode(self, arch: Arch) -> np.ndarray:
        """One-hot features (resolution, depth per stage, kernel and expand per slot; 0 if inactive)."""
        self.validate(arch)
        vec = np.zeros(self.encoding_size, dtype=np.float32)
        pos = 0
        vec[pos + self.resolution_choices.index(arch.resolution)] = 1
        pos += len(self.resolution_choices)
        for depth in arch.depths:
            vec[pos + self.depth_choices.index(depth)] = 1
            pos += len(self.depth_choices)
        nk, ne = len(self.kernel_choices), len(self.expand_choices)
        for stage, index, kernel, expand in self.iter_stage_blocks(arch):
            slot = pos + (stage * self.max_depth + index) * (nk + ne)
            vec[slot + self.kernel_choices.index(kernel)] = 1
            vec[slot + nk + self.expand_choices.index(expand)] = 1
        return vec

    # ---- fast paths a searcher looks for (hwnas.search.protocols); each built once per space ---------------
    def gene_codec(self) -> GeneCodec:
        """This space's archs as integer rows, for batched variation and pricing (`hwnas.genes`)."""
        if "gene_codec" not in self._cache:
            from hwnas.genes import GeneCodec

            self._cache["gene_codec"] = GeneCodec(self)
        codec: GeneCodec = self._cache["gene_codec"]
        return codec

    def encode_many(self, archs: Sequence[Arch]) -> np.ndarray:
        """`encode` of many archs at once, as one (n, encoding_size) float32 array."""
        if "encoder" not in self._cache:
            from hwnas.genes import OneHotEncoder

            self._cache["encoder"] = OneHotEncoder(self)
        encoded: np.ndarray = self._cache["encoder"](archs)
        return encoded

    def flops_params(self, arch: Arch) -> tuple[int, int]:
        """FLOPs (one image) and trainable parameters of `arch`, from per-slot cached counts (`hwnas.flops`)."""
        if "costs" not in self._cache:
            from hwnas.flops import ArchCosts

            self._cache["costs"] = ArchCosts(self)
        costs: tuple[int, int] = self._cache["costs"](arch)
        return costs

    def size(self) -> int:
        """The number of distinct subnets (distinct networks, not distinct gene strings)."""
        per_block = len(self.kernel_choices) * len(self.expand_choices)
        per_stage = sum(per_block**d for d in self.depth_choices)
        return len(self.resolution_choices) * per_stage**self.num_stages
