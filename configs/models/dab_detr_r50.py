"""DAB-DETR, ResNet-50, stride 32 (paper Table 2: 42.2 AP at 50 epochs, 44M parameters).

The class count is set once, in `model.num_classes`; head and criterion read it by interpolation.
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from dab_detr.meta_arch import DABDETR, resnet_stages
from dab_detr.modeling.criterion import SetCriterion
from dab_detr.modeling.dab_detr_head import DabDetrHead
from dab_detr.modeling.matcher import HungarianMatcher

model = L(DABDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(resnet_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN", res5_dilation=1),
        out_features=["res5"],
        # 1 = stem frozen, res2 trained (detrex, 43.3 AP); the official code uses 2 (42.2 AP).
        freeze_at=1,
    ),
    # in_channels is left out: DABDETR reads it from backbone.output_shape()[in_feature].
    head=L(DabDetrHead)(
        num_classes="${..num_classes}",
        hidden_dim=256,
        num_queries=300,
        nheads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.0,
        activation="prelu",
        num_patterns=0,
        pe_temperature_h=20,
        pe_temperature_w=20,
        aux_loss=True,
        dn=False,  # denoising training (DN-DETR): configs/dn_dab_detr_*.py
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0),
        loss_class=1.0,
        loss_bbox=5.0,
        loss_giou=2.0,
    ),
    num_classes=80,
    in_feature="res5",
    # ImageNet statistics of torchvision / timm weights, RGB 0-255
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    num_select=300,
    size_divisibility=32,
)
