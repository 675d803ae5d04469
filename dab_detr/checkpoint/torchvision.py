"""torchvision ResNet (ImageNet) state dict -> detectron2 `ResNet` keys of our `DABDETR` (`backbone.stem.*`,
`backbone.res2..res5.*`), the usual `train.init_checkpoint` for COCO training.

torchvision puts the stride in the 3x3 conv (`conv2`), which is detectron2's `stride_in_1x1=False`, the setting of
our configs; its `layer1..4` are detectron2's `res2..5`, `downsample.0/1` the `shortcut` conv and its norm.
"""
from typing import Mapping, Optional

from torch import Tensor

from .hf import _TIMM_BACKBONE  # timm's ResNet keeps torchvision's module names: one table serves both
from .io import Conversion, rename_state_dict

__all__ = ["convert_torchvision_resnet", "torchvision_resnet_key"]


def torchvision_resnet_key(key: str) -> Optional[str]:
    """Our key (`backbone.*`) for a torchvision ResNet key such as `layer1.0.bn2.weight`, or None."""
    for pattern, target in _TIMM_BACKBONE:
        m = pattern.match(key)
        if m:
            return target(m) if callable(target) else m.expand(target)
    return None


def convert_torchvision_resnet(state_dict: Mapping[str, Tensor]) -> Conversion:
    """Rename a torchvision `resnet50()/resnet101().state_dict()` into our backbone keys.

    The ImageNet classifier (`fc.*`) and BN's `num_batches_tracked` counters are dropped (`ignored_keys`);
    anything else that is not a ResNet key is returned in `unused_keys`.
    """
    return rename_state_dict(state_dict, torchvision_resnet_key, source="torchvision",
                             drop=lambda key: key.startswith("fc."))
