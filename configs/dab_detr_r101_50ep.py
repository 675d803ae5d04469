"""DAB-DETR R101, COCO, 50 epochs (paper: 43.5 AP, 63M parameters; detrex: 44.0 AP).
Initialise from torchvision's ResNet-101: tools/convert_weights.py --source torchvision."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_detr_r101 import model
