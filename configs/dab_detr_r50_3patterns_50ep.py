"""DAB-DETR R50 with 3 pattern embeddings (900 queries), COCO, 50 epochs (paper: 42.6 AP)."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_detr_r50_3patterns import model
