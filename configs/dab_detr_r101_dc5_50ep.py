"""DAB-DETR R101-DC5, COCO, 50 epochs (paper: 45.8 AP, 282 GFLOPs)."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_detr_r101_dc5 import model
