"""DAB-DETR R50-DC5, COCO, 50 epochs (paper: 44.5 AP, 202 GFLOPs): res5 dilated, stride 16."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_detr_r50_dc5 import model
