"""DN-Deformable-DETR R50, COCO, 50 epochs: DAB-Deformable-DETR trained with denoising queries (DN-DETR, Li et
al., CVPR 2022, arXiv 2203.01305; paper: 48.6 AP). The same model at inference.

    python tools/train_net.py --config-file configs/dn_dab_deformable_detr_r50_50ep.py --num-gpus 8 \
        train.init_checkpoint=weights/R-50.pth      # tools/convert_weights.py --source torchvision

DN-Deformable-DETR's recipe is DAB-Deformable-DETR's (configs/dab_deformable_detr_r50_50ep.py: AdamW lr 1e-4,
backbone 1e-5, batch 16, lr x 0.1 at epoch 40, 300 queries, 4 levels, single-stage) plus 5 denoising groups,
label noise 0.2 and box noise 0.4 (docs/denoising.md). The matching queries keep their learned content vectors,
as in detrex's DN-Deformable-DETR (no pattern embedding, unlike configs/dn_dab_detr_r50_50ep.py).
"""
from .dab_deformable_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_deformable_detr_r50 import model

model.head.dn = True
model.head.denoising_groups = 5
model.head.label_noise_prob = 0.2
model.head.box_noise_scale = 0.4
