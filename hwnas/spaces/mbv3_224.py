"""Once-for-All's MobileNetV3 space (OFA-MBv3, width 1.0) at 160-224 px, for ImageNet-class deployment."""

from hwnas.space import SearchSpace, StageSpec


def mbv3_224(in_channels: int = 3, num_classes: int = 1000) -> SearchSpace:
    return SearchSpace(
        name="mbv3-224",
        in_channels=in_channels,
        num_classes=num_classes,
        stem_channels=16,
        stem_stride=2,
        stem_act="hswish",
        first_channels=16,
        stages=(
            StageSpec(24, stride=2, act="relu", se=False),
            StageSpec(40, stride=2, act="relu", se=True),
            StageSpec(80, stride=2, act="hswish", se=False),
            StageSpec(112, stride=1, act="hswish", se=True),
            StageSpec(160, stride=2, act="hswish", se=True),
        ),
        final_expand_channels=960,
        feature_channels=1280,
        head_act="hswish",
        kernel_choices=(3, 5, 7),
        expand_choices=(3, 4, 6),
        depth_choices=(2, 3, 4),
        resolution_choices=(160, 176, 192, 208, 224),
        dropout=0.1,
        description="Once-for-All MobileNetV3 (w1.0): 5 elastic stages, SE and h-swish as in MobileNetV3",
    )
