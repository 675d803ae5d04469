"""DAB-DETR R50-DC5 with 3 pattern embeddings, COCO, 50 epochs (paper: 45.7 AP, 216 GFLOPs)."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_detr_r50_dc5_3patterns import model
