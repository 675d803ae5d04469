"""detrex checkpoints -> our layout: `projects/dab_detr` (-> `DABDETR`) and `projects/dab_deformable_detr`
(-> `DABDeformableDETR`, see `deformable.py`).

detrex builds DAB-DETR from generic containers; the renames to our (official) names are:
`encoder.layers.i.attentions.0.attn` -> `self_attn`, `ffns.0.layers.0.0` -> `linear1`, `ffns.0.layers.1` ->
`linear2`, `ffns.0.layers.0.1` (the PReLU) -> `activation` (the same module is registered again as
`ffns.0.activation`: checked equal and dropped), `norms.i` -> `norm{i+1}`; decoder self-attention
`attentions.0.{query,key}_{content,pos}_proj` / `value_proj` -> `sa_{q,k}{content,pos}_proj` / `sa_v_proj`,
cross-attention `attentions.1.*` -> `ca_*` (`query_pos_sine_proj` -> `ca_qpos_sine_proj`),
`decoder.post_norm_layer` -> `decoder.norm`; `bbox_embed` is tied to `transformer.decoder.bbox_embed` (dropped).
detrex's backbone is already a detectron2 ResNet; its classifier has the 80 detectron2 classes.
"""
import re
from typing import Mapping, Optional

from torch import Tensor

from .deformable import convert_deformable_state_dict, is_deformable_state_dict
from .io import Conversion, rename_state_dict

__all__ = ["convert_detrex_state_dict"]

_ATTN = {"query_content_proj": "qcontent_proj", "query_pos_proj": "qpos_proj", "key_content_proj": "kcontent_proj",
         "key_pos_proj": "kpos_proj", "value_proj": "v_proj", "query_pos_sine_proj": "qpos_sine_proj"}
_TIED_BOX = "transformer.decoder.bbox_embed."  # the decoder's copy of the top-level `bbox_embed`


def _layer_key(part: str, rest: str) -> Optional[str]:
    """Inside `transformer.{encoder,decoder}.layers.i.`: detrex sub-key -> ours."""
    if part == "encoder" and rest.startswith("attentions.0.attn."):
        return "self_attn." + rest[len("attentions.0.attn."):]
    m = re.match(r"attentions\.([01])\.(\w+)\.(weight|bias)$", rest)
    if part == "decoder" and m:
        prefix = "sa" if m.group(1) == "0" else "ca"
        if m.group(2) == "out_proj":
            return f"{'self_attn' if prefix == 'sa' else 'cross_attn'}.out_proj.{m.group(3)}"
        if m.group(2) in _ATTN:
            return f"{prefix}_{_ATTN[m.group(2)]}.{m.group(3)}"
        return None
    for old, new in (("ffns.0.layers.0.0.", "linear1."), ("ffns.0.layers.1.", "linear2."),
                     ("ffns.0.layers.0.1.", "activation.")):
        if rest.startswith(old):
            return new + rest[len(old):]
    m = re.match(r"norms\.(\d)\.(.*)", rest)
    if m:
        return f"norm{int(m.group(1)) + 1}.{m.group(2)}"
    return None


def _dab_detr_key(key: str) -> Optional[str]:
    if key.startswith("backbone."):
        return key
    m = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)", key)
    if m:
        new = _layer_key(m.group(1), m.group(3))
        return None if new is None else f"head.transformer.{m.group(1)}.layers.{m.group(2)}.{new}"
    if key.startswith("transformer.decoder.post_norm_layer."):
        return "head.transformer.decoder.norm." + key[len("transformer.decoder.post_norm_layer."):]
    if key.startswith("bbox_embed."):
        return "head.transformer.decoder.bbox_embed." + key[len("bbox_embed."):]
    for prefix in ("transformer.encoder.query_scale.", "transformer.decoder.query_scale.",
                   "transformer.decoder.ref_point_head.", "transformer.decoder.ref_anchor_head.",
                   "transformer.decoder.bbox_embed.", "anchor_box_embed.", "class_embed.", "input_proj."):
        if key.startswith(prefix):
            return "head." + key
    return None


def _twin(key: str, state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """The original of a tied copy: the top-level `bbox_embed` of the decoder's, the FFN's `layers.0.1` PReLU of
    its `activation`; None if `key` is no copy or its original is absent."""
    twin = None
    if key.startswith(_TIED_BOX):
        twin = "bbox_embed." + key[len(_TIED_BOX):]
    m = re.match(r"(transformer\.(?:en|de)coder\.layers\.\d+\.ffns\.0\.)activation\.(.*)", key)
    if m:
        twin = f"{m.group(1)}layers.0.1.{m.group(2)}"
    return twin if twin in state_dict else None


def convert_detrex_state_dict(state_dict: Mapping[str, Tensor]) -> Conversion:
    """Rename a detrex DAB-DETR or DAB-Deformable-DETR (single- or two-stage) `checkpoint["model"]`."""
    if is_deformable_state_dict(state_dict):
        return convert_deformable_state_dict(state_dict, "detrex")
    return rename_state_dict(state_dict, _dab_detr_key, _twin, source="detrex")
