"""DAB-DETR, ResNet-50-DC5: res5 dilated, stride 16 (paper Table 2: 44.5 AP, 202 GFLOPs)."""
from .dab_detr_r50 import model

model.backbone.stages.res5_dilation = 2
# The released official R50-DC5 checkpoint was trained with image PE temperature 10 (not the default 20).
model.head.pe_temperature_h = 10
model.head.pe_temperature_w = 10
