"""DAB-Deformable-DETR R50, COCO, 50 epochs (official: 48.7 AP; detrex: 49.0 AP).

    python tools/train_net.py --config-file configs/dab_deformable_detr_r50_50ep.py --num-gpus 8 \
        train.init_checkpoint=weights/R-50.pth      # tools/convert_weights.py --source torchvision

AdamW lr 1e-4 (backbone 1e-5), weight decay 1e-4, gradient clip 0.1, batch 16 = 8 GPUs x 2 images,
lr x0.1 at epoch 40 (configs/common).
"""
from .common.data.coco_detr import dataloader
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier_50ep as lr_multiplier
from .common.train import train
from .models.dab_deformable_detr_r50 import model

train.max_iter = 375000  # 50 epochs x 7,500 iterations (118,287 images / 16, rounded like detrex)
train.eval_period = 7500
train.checkpointer.period = 7500
