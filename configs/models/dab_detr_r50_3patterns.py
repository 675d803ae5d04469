"""DAB-DETR, ResNet-50, 3 pattern embeddings: 3 x 300 = 900 queries (paper Table 2: 42.6 AP)."""
from .dab_detr_r50 import model

model.head.num_patterns = 3
