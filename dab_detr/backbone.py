"""Small detectron2 ResNets for training from scratch (the embedded dataset, tests)."""
from typing import List, Sequence

from detectron2.modeling.backbone.resnet import BasicBlock, ResNet


def small_resnet_stages(
    depths: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (32, 64, 128, 256),
    stem_width: int = 32,
    strides: Sequence[int] = (1, 2, 2, 1),
    norm: str = "BN",
) -> List[list]:
    """Stages res2..res5 of a basic-block ResNet, for `ResNet(stem=BasicStem(out_channels=stem_width), stages=...)`.

    The default last stride of 1 keeps res5 at stride 16: small images then still give the encoder enough tokens
    (128 px -> 8x8). Trainable BN (`norm="BN"`) because FrozenBN is an identity when nothing was pretrained.
    """
    if not (len(depths) == len(widths) == len(strides) == 4):
        raise ValueError(
            f"small_resnet_stages: depths, widths and strides need 4 entries each (res2..res5), got "
            f"{list(depths)}, {list(widths)}, {list(strides)}"
        )
    stages, in_channels = [], stem_width
    for depth, width, stride in zip(depths, widths, strides):
        stages.append(
            ResNet.make_stage(
                BasicBlock, depth, in_channels=in_channels, out_channels=width,
                stride_per_block=[stride] + [1] * (depth - 1), norm=norm,
            )
        )
        in_channels = width
    return stages
