"""Once-for-All's MobileNetV3 space at width 1.2 (OFA-MBv3 w1.2) at 160-224 px.

The same choices as `mbv3-224`; every fixed width is OFA's base width times 1.2, rounded to a
multiple of 8 as OFA rounds it (`make_divisible`), so that `ofa_mbv3_d234_e346_k357_w1.2` maps
onto it tensor for tensor (`hwnas import ofa`).
"""

from dataclasses import replace

from hwnas.space import SearchSpace
from hwnas.spaces.mbv3_224 import mbv3_224

# OFA's widths at 1.2: the stem and first block, the five stages, the final expansion and the features
STEM, STAGES, FINAL_EXPAND, FEATURES = 24, (32, 48, 96, 136, 192), 1152, 1536


def mbv3_224_w12(in_channels: int = 3, num_classes: int = 1000) -> SearchSpace:
    base = mbv3_224(in_channels, num_classes)
    return replace(base, name="mbv3-224-w1.2", stem_channels=STEM, first_channels=STEM,
                   stages=tuple(replace(stage, out_channels=c) for stage, c in zip(base.stages, STAGES, strict=True)),
                   final_expand_channels=FINAL_EXPAND, feature_channels=FEATURES,
                   description="Once-for-All MobileNetV3 (w1.2): mbv3-224 with every fixed width x1.2")
