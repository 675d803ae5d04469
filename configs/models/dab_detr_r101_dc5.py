"""DAB-DETR, ResNet-101-DC5: res5 dilated, stride 16 (paper Table 2: 45.8 AP)."""
from .dab_detr_r50 import model

model.backbone.stages.depth = 101
model.backbone.stages.res5_dilation = 2
