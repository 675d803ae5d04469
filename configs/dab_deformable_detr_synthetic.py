"""DAB-Deformable-DETR trained from scratch on the embedded synthetic dataset, sized for a 2-core CPU.

Same data, optimiser and schedule as `dab_detr_synthetic.py` (see there for what makes a DETR learn from scratch
in minutes); the model reads two levels of the tiny ResNet (strides 16 and 32: 8x8 and 4x4 tokens at 128 px)
plus one stride-64 conv level (2x2), with 3 encoder / 3 decoder layers of width 128. Reading res3 too (a 16x16
level, 340 tokens instead of 84) made inference 2.6x slower here for objects this size.

    python tools/train_net.py --config-file configs/dab_deformable_detr_synthetic.py
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from dab_detr.backbone import small_resnet_stages

from .dab_detr_synthetic import dataloader, lr_multiplier, optimizer, train
from .models.dab_deformable_detr_r50 import model

model.backbone = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=32, norm="BN"),
    stages=L(small_resnet_stages)(depths=[1, 1, 1, 1], widths=[32, 64, 128, 256], stem_width=32,
                                  strides=[1, 2, 2, 2], norm="BN"),
    out_features=["res4", "res5"],
    freeze_at=0,
)
model.in_features = ["res4", "res5"]
model.size_divisibility = 32
model.head.num_feature_levels = 3
model.head.hidden_dim = 128
model.head.nheads = 8
model.head.num_encoder_layers = 3
model.head.num_decoder_layers = 3
model.head.dim_feedforward = 512
model.head.num_queries = 30  # up to 6 objects per image
model.head.anchor_init = "spread"
model.num_select = 100
model.num_classes = 5  # taken from the dataset by tools/train_net.py anyway

train.output_dir = "./output/synthetic_deformable"
