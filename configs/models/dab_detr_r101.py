"""DAB-DETR, ResNet-101, stride 32 (paper Table 2: 43.5 AP, 63M parameters)."""
from .dab_detr_r50 import model

model.backbone.stages.depth = 101
