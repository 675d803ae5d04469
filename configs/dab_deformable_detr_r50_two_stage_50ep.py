"""Two-stage DAB-Deformable-DETR R50, COCO, 50 epochs (detrex: 49.7 AP).

The encoder scores every token; the top 300 become the decoder's anchors and content queries (detached), and
the selected proposals get their own loss (`loss_*_enc`). Same schedule as the single-stage config.
"""
from .dab_deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.head.two_stage = True
