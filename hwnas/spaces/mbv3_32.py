"""A small MobileNetV3-style space for 28-32 px images (Fashion-MNIST, CIFAR) that trains on a CPU."""

from hwnas.space import SearchSpace, StageSpec


def mbv3_32(in_channels: int = 1, num_classes: int = 10) -> SearchSpace:
    return SearchSpace(
        name="mbv3-32",
        in_channels=in_channels,
        num_classes=num_classes,
        stem_channels=16,
        stem_stride=2,
        stem_act="hswish",
        first_channels=16,
        stages=(
            StageSpec(24, stride=2, act="relu", se=False),
            StageSpec(40, stride=2, act="hswish", se=True),
            StageSpec(64, stride=1, act="hswish", se=True),
            StageSpec(96, stride=2, act="hswish", se=True),
        ),
        final_expand_channels=384,
        feature_channels=512,
        head_act="hswish",
        kernel_choices=(3, 5, 7),
        expand_choices=(3, 4, 6),
        depth_choices=(2, 3, 4),
        resolution_choices=(24, 28, 32),
        dropout=0.1,
        description="MobileNetV3-style, 4 elastic stages, 24-32 px, stride-2 stem (trains on a CPU), 1-channel input",
    )
