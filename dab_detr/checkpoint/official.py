"""Official DAB-DETR (IDEA-Research/DAB-DETR, `models/DAB_DETR`) state dict -> our `DABDETR` state dict
(`models/dab_deformable_detr` checkpoints: see `deformable.py`).

Our transformer keeps the official module names (`nn.MultiheadAttention`'s packed `in_proj_weight` in the encoder,
`sa_*`/`ca_*` projections in the decoder, `ca_qpos_proj` in layer 0 only unless `keep_query_pos`), so the
transformer moves under `head.` unchanged. What is renamed:

- `backbone.0.body.*` (torchvision ResNet) -> detectron2 `backbone.stem/res2..res5.*`;
- `refpoint_embed.weight` (anchor logits) -> `head.anchor_box_embed.weight` (a `freeze_anchor_xy` model splits it
  on load);
- `bbox_embed.*` -> `head.transformer.decoder.bbox_embed.*`; the official model registers the same module a second
  time as `transformer.decoder.bbox_embed.*`: that copy is checked to be equal and dropped.

The classifier keeps its 91 raw-COCO-id rows here; `classes.select_classes` maps them to 80 classes.
"""
from typing import Mapping, Optional

from torch import Tensor

from .deformable import convert_deformable_state_dict, is_deformable_state_dict
from .io import Conversion, rename_state_dict
from .torchvision import torchvision_resnet_key

__all__ = ["convert_official_state_dict"]

_BACKBONE_PREFIX = "backbone.0.body."
_TIED_BOX_PREFIX = "transformer.decoder.bbox_embed."
# official module path -> ours; a key maps by its longest matching prefix, the rest of the key is kept
_RENAMES = {
    "refpoint_embed": "head.anchor_box_embed",
    "bbox_embed": "head.transformer.decoder.bbox_embed",
    "class_embed": "head.class_embed",
    "input_proj": "head.input_proj",
    "transformer": "head.transformer",
}


def _rename(key: str) -> Optional[str]:
    if key.startswith(_BACKBONE_PREFIX):
        return torchvision_resnet_key(key[len(_BACKBONE_PREFIX):])
    for old in sorted(_RENAMES, key=len, reverse=True):
        if key.startswith(old + "."):
            return _RENAMES[old] + key[len(old):]
    return None


def _tied_box_twin(key: str, state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """`bbox_embed.*` for its decoder copy; alone, the copy maps like any transformer key."""
    twin = "bbox_embed." + key[len(_TIED_BOX_PREFIX):]
    return twin if key.startswith(_TIED_BOX_PREFIX) and twin in state_dict else None


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> Conversion:
    """Rename an official DAB-DETR `checkpoint["model"]` into `DABDETR`'s layout (see the module doc).

    Keys that map to nothing (e.g. a Swin backbone, segmentation heads) are returned in `unused_keys`.
    A DAB-Deformable-DETR checkpoint (it has `transformer.level_embed`) goes to `DABDeformableDETR`'s layout.
    """
    if is_deformable_state_dict(state_dict):
        return convert_deformable_state_dict(state_dict, "official")
    return rename_state_dict(state_dict, _rename, _tied_box_twin, source="official")
