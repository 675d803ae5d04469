"""DAB-DETR for detectron2.

Importing this package registers the `DABDETR` meta-architecture in detectron2's `META_ARCH_REGISTRY` and does
nothing else to detectron2. The embedded synthetic dataset is registered by `register_synthetic_dataset()`
(`configs/dab_detr_synthetic.py` calls it), and `tools/train_net.py` selects faster-coco-eval for COCO evaluation
(`dab_detr.evaluation.enable_faster_coco_eval`).
"""
from . import meta_arch  # noqa: F401  (registers DABDETR in META_ARCH_REGISTRY)
from .config import add_dab_detr_config
from .data import register_synthetic_dataset
from .meta_arch import DABDETR

__version__ = "0.1.0"
__all__ = ["DABDETR", "add_dab_detr_config", "register_synthetic_dataset"]
