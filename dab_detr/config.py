"""yacs options for DAB-DETR (`cfg.MODEL.DAB_DETR.*`), generated from the constructors' defaults.

The defaults live in one place, the signatures of `DABDETR`, `DabDetrHead`, `HungarianMatcher` and `SetCriterion`
(the LazyConfig files in `configs/models/` call the same constructors); each argument `name` with a default is the
yacs key `NAME`. `configs/yacs/Base-DAB-DETR.yaml` sets the detectron2 keys the model needs (ResNet `res5`
output, FrozenBN, RGB ImageNet statistics, DETR's augmentations):

    cfg = get_cfg(); add_dab_detr_config(cfg); cfg.merge_from_file("configs/yacs/dab_detr_R_50.yaml")

Paper defaults: docs/design.md §3.
"""
import inspect
from typing import Callable, Dict

from detectron2.config import CfgNode as CN

__all__ = ["add_dab_detr_config", "yacs_arguments"]

# Arguments that are not options: built from other keys, or read from detectron2's own (`INPUT.FORMAT`).
_NOT_OPTIONS = {"self", "in_channels", "input_format", "matcher"}


def _option_defaults(fn: Callable) -> Dict[str, object]:
    return {
        name.upper(): p.default
        for name, p in inspect.signature(fn).parameters.items()
        if name not in _NOT_OPTIONS and p.default is not inspect.Parameter.empty
    }


def add_dab_detr_config(cfg: CN) -> None:
    """Add `MODEL.DAB_DETR` with one key per constructor argument (and `NUM_CLASSES`, default 80)."""
    # Imported here so that `import dab_detr` does not need scipy (the matcher's).
    from .meta_arch import DABDETR
    from .modeling.criterion import SetCriterion
    from .modeling.dab_detr_head import DabDetrHead
    from .modeling.matcher import HungarianMatcher

    c = CN()
    c.NUM_CLASSES = 80
    for fn in (DABDETR.__init__, DabDetrHead.__init__, HungarianMatcher.__init__, SetCriterion.__init__):
        for key, value in _option_defaults(fn).items():
            if key in c and c[key] != value:
                raise RuntimeError(f"MODEL.DAB_DETR.{key}: two constructors disagree on its default ({c[key]!r}, "
                                   f"{value!r})")
            c[key] = value
    cfg.MODEL.DAB_DETR = c


def yacs_arguments(fn: Callable, node: CN) -> Dict[str, object]:
    """The arguments of `fn` that `node` (`cfg.MODEL.DAB_DETR`) sets, by the naming rule above."""
    return {k.lower(): node[k] for k in _option_defaults(fn) if k in node}
