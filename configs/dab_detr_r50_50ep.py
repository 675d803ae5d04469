"""DAB-DETR R50, COCO, 50 epochs (paper: 42.2 AP; detrex, res2 trained: 43.3 AP).

    python tools/train_net.py --config-file configs/dab_detr_r50_50ep.py --num-gpus 8 \
        train.init_checkpoint=weights/R-50.pth      # tools/convert_weights.py --source torchvision

Batch 16 = 8 GPUs x 2 images. With another total batch B keep lr 1e-4 and scale the iterations by 16/B (we do
not scale the lr linearly: DETR-family training is known to diverge at larger lr, detrex#222); see README.
"""
from .common.data.coco_detr import dataloader
from .common.optim import AdamW as optimizer
from .common.schedule import lr_multiplier_50ep as lr_multiplier
from .common.train import train
from .models.dab_detr_r50 import model

train.max_iter = 375000  # 50 epochs x 7,500 iterations (118,287 images / 16, rounded like detrex)
train.eval_period = 7500  # every epoch
train.checkpointer.period = 7500
