"""detectron2 glue for DAB-Deformable-DETR: DAB-DETR's glue with several backbone levels and an encoder loss.

Preprocessing, padding masks, target preparation, top-k inference and `Instances` are `DABDETR`'s; only the
head connection (several `in_features`) and the raw forward differ; the two-stage encoder loss is the criterion's
(`outputs["enc_outputs"]`).
"""
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone
from detectron2.structures import ImageList
from torch import nn

from .meta_arch import DABDETR
from .modeling.dab_deformable_head import DabDeformableDetrHead
from .modeling.targets import TargetBatch

__all__ = ["DABDeformableDETR"]


@META_ARCH_REGISTRY.register()
class DABDeformableDETR(DABDETR):
    """DAB-Deformable-DETR on a detectron2 backbone that outputs `in_features` (strides increasing, e.g.
    res3, res4, res5); the head adds its extra stride-2 levels up to `num_feature_levels`.

    In training, with a two-stage head, the criterion also scores the selected encoder proposals
    (losses suffixed `_enc`), as detrex does (same classes and matching as the decoder outputs, matched in the
    same call).
    """

    min_onnx_opset = 16  # deformable attention samples with grid_sample (ONNX GridSample, opset 16)

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: DabDeformableDetrHead,
        criterion: Optional[nn.Module],
        num_classes: int,
        in_features: Sequence[str] = ("res3", "res4", "res5"),
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        num_select: int = 300,
        size_divisibility: int = 32,
        channels_last: bool = True,
    ):
        if isinstance(in_features, str) or not in_features:
            raise ValueError(f"DABDeformableDETR: in_features must be a non-empty list of names, got {in_features!r}")
        super().__init__(
            backbone=backbone, head=head, criterion=criterion, num_classes=num_classes,
            in_feature=tuple(in_features), pixel_mean=pixel_mean, pixel_std=pixel_std, input_format=input_format,
            num_select=num_select, size_divisibility=size_divisibility, channels_last=channels_last,
        )
        self.in_features = list(in_features)

    @classmethod
    def from_config(cls, cfg):
        raise ValueError("DABDeformableDETR: build it from a LazyConfig (configs/dab_deformable_detr_*.py); "
                         "there is no yacs MODEL.DAB_DETR variant for it")

    @staticmethod
    def connect_head(shapes, head: nn.Module, in_feature) -> None:
        """Check `in_features` (given as `in_feature`) against the backbone and build the head's projections."""
        missing = [f for f in in_feature if f not in shapes]
        if missing:
            raise ValueError(f"DABDeformableDETR: in_features {missing} are not backbone outputs {sorted(shapes)}")
        strides = [shapes[f].stride for f in in_feature]
        if strides != sorted(strides):
            raise ValueError(f"DABDeformableDETR: in_features {list(in_feature)} must have increasing strides")
        if len(in_feature) > head.num_feature_levels:
            raise ValueError(
                f"DABDeformableDETR: head.num_feature_levels={head.num_feature_levels} is fewer than the "
                f"{len(in_feature)} in_features {list(in_feature)}"
            )
        channels = [shapes[f].channels for f in in_feature]
        if head.input_proj is None:
            head.build_input_proj(channels)
        else:
            have = [proj[0].in_channels for proj in head.input_proj[: len(channels)]]
            if have != channels:
                raise ValueError(f"DABDeformableDETR: head in_channels={have} but in_features have {channels}")

    def forward_raw(self, images: ImageList, targets: Optional[TargetBatch] = None) -> Dict[str, object]:
        """Raw head outputs for a normalised, padded batch; `targets` feed the head's denoising queries in training
        (if it has `dn` on)."""
        x = images.tensor
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        return self.head([features[f] for f in self.in_features], self.padding_mask(images, x.shape[-2:]), targets)
