"""DAB-DETR for detectron2.

Importing this package registers the `DABDETR` and `DABDeformableDETR` meta-architectures and the embedded
synthetic dataset (`dab_synthetic_train` / `dab_synthetic_val`, generated on first use), and makes
faster-coco-eval detectron2's fast COCO evaluator when detectron2 has no compiled `_C`.
"""
from . import meta_arch, meta_arch_deformable  # noqa: F401  (register DABDETR, DABDeformableDETR)
from .config import add_dab_detr_config
from .data import register_synthetic_dataset
from .evaluation import enable_faster_coco_eval
from .meta_arch import DABDETR

__version__ = "0.1.0"
__all__ = ["DABDETR", "add_dab_detr_config", "register_synthetic_dataset"]

enable_faster_coco_eval()
register_synthetic_dataset()
