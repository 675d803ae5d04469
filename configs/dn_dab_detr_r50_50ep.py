"""DN-DAB-DETR R50, COCO, 50 epochs: DAB-DETR trained with denoising queries (DN-DETR, Li et al., CVPR 2022,
arXiv 2203.01305; paper: 44.1 AP, detrex: 44.7, vs 42.2 for DAB-DETR). The same model at inference.

    python tools/train_net.py --config-file configs/dn_dab_detr_r50_50ep.py --num-gpus 8 \
        train.init_checkpoint=weights/R-50.pth      # tools/convert_weights.py --source torchvision

DN-DETR's recipe is DAB-DETR's (AdamW lr 1e-4, backbone 1e-5, batch 16, lr x 0.1 at epoch 40) plus 5 denoising
groups, label noise 0.2 and box noise 0.4. Its matching queries share one learned content vector (the label
embedding's extra "no object" row, indicator bit 0), which is a single pattern embedding here (`num_patterns=1`);
official DN-DETR and detrex dn_detr checkpoints convert into this config (tools/convert_weights.py).
"""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_detr_r50 import model

model.head.dn = True
model.head.denoising_groups = 5
model.head.label_noise_prob = 0.2
model.head.box_noise_scale = 0.4
model.head.num_patterns = 1
