"""DN-DETR checkpoints (DN-DAB-DETR: official IDEA-Research/DN-DETR `models/DN_DAB_DETR`, and detrex
`projects/dn_detr`) -> our `DABDETR` with denoising training (configs/dn_dab_detr_r50_50ep.py).

Both are DAB-DETR plus a label embedding of C+1 rows, hidden_dim - 1 wide (`label_enc` / `denoising_generator.
label_encoder`). Rows 0..C-1 embed the classes of the denoising queries: they become our
`head.denoising.label_embed` (training-only; a model with dn off drops it when loading). Row C is the content of
*every matching query* (with the indicator bit 0), also at inference: a content vector shared by all anchors is one
pattern embedding, so it becomes `head.transformer.patterns.weight` = `[[row C, 0]]` (`num_patterns=1`); with P
official patterns (added to that row), P rows `pattern_p + [row C, 0]`.

- official: the DAB-DETR layout (`official.py`) + `label_enc.weight`;
- detrex: detectron2 ResNet keys (kept), detrex's layer sequences renamed to our module names (table below),
  `anchor_box_embed`, `class_embed`, `bbox_embed` (tied copy in `transformer.decoder.bbox_embed`, checked and
  dropped) + `denoising_generator.label_encoder.weight`.
"""
import re
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from .io import CheckpointError, Conversion, rename_state_dict
from .official import convert_official_state_dict

__all__ = ["DN_LABEL_EMBED_KEY", "convert_dn_detr_state_dict", "convert_detrex_dn_detr_state_dict"]

DN_LABEL_EMBED_KEY = "head.denoising.label_embed.weight"
PATTERNS_KEY = "head.transformer.patterns.weight"

# detrex layer-sequence names -> ours, per encoder / decoder layer (the rest of the key is kept)
_DETREX_ENCODER_LAYER = {
    "attentions.0.attn.": "self_attn.",
    "ffns.0.layers.0.0.": "linear1.",
    "ffns.0.layers.1.": "linear2.",
    "ffns.0.activation.": "activation.",
    "norms.0.": "norm1.",
    "norms.1.": "norm2.",
}
_DETREX_DECODER_LAYER = {
    "attentions.0.query_content_proj.": "sa_qcontent_proj.",
    "attentions.0.query_pos_proj.": "sa_qpos_proj.",
    "attentions.0.key_content_proj.": "sa_kcontent_proj.",
    "attentions.0.key_pos_proj.": "sa_kpos_proj.",
    "attentions.0.value_proj.": "sa_v_proj.",
    "attentions.0.out_proj.": "self_attn.out_proj.",
    "attentions.1.query_content_proj.": "ca_qcontent_proj.",
    "attentions.1.query_pos_proj.": "ca_qpos_proj.",
    "attentions.1.query_pos_sine_proj.": "ca_qpos_sine_proj.",
    "attentions.1.key_content_proj.": "ca_kcontent_proj.",
    "attentions.1.key_pos_proj.": "ca_kpos_proj.",
    "attentions.1.value_proj.": "ca_v_proj.",
    "attentions.1.out_proj.": "cross_attn.out_proj.",
    "ffns.0.layers.0.0.": "linear1.",
    "ffns.0.layers.1.": "linear2.",
    "ffns.0.activation.": "activation.",
    "norms.0.": "norm1.",
    "norms.1.": "norm2.",
    "norms.2.": "norm3.",
}
# detrex's FFN registers its PReLU twice (`ffns.0.activation` and, inside the Sequential, `ffns.0.layers.0.1`)
_DETREX_PRELU_TWIN = re.compile(r"^transformer\.(encoder|decoder)\.layers\.\d+\.ffns\.0\.layers\.0\.1\.weight$")
_DETREX_TOP = {
    "anchor_box_embed.": "head.anchor_box_embed.",
    "class_embed.": "head.class_embed.",
    "bbox_embed.": "head.transformer.decoder.bbox_embed.",
    "input_proj.": "head.input_proj.",
    "transformer.decoder.post_norm_layer.": "head.transformer.decoder.norm.",
    "transformer.decoder.bbox_embed.": "head.transformer.decoder.bbox_embed.",  # when it has no tied original
    "transformer.decoder.query_scale.": "head.transformer.decoder.query_scale.",
    "transformer.decoder.ref_point_head.": "head.transformer.decoder.ref_point_head.",
    "transformer.decoder.ref_anchor_head.": "head.transformer.decoder.ref_anchor_head.",
    "transformer.encoder.query_scale.": "head.transformer.encoder.query_scale.",
}
_DETREX_LABEL_ENCODER = "denoising_generator.label_encoder.weight"
_DETREX_LAYER = re.compile(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)$")


def _label_embedding(label_enc: Tensor, patterns: Optional[Tensor], name: str) -> Dict[str, Tensor]:
    """Our denoising label embedding and matching-query patterns from a (C+1, d-1) label embedding (see module doc)."""
    if label_enc.dim() != 2 or label_enc.shape[0] < 2:
        raise CheckpointError(f"{name} must be (num_classes + 1, hidden_dim - 1), got {tuple(label_enc.shape)}")
    no_object = torch.cat((label_enc[-1], label_enc.new_zeros(1)))[None]  # indicator bit 0: a matching query
    patterns = no_object if patterns is None else patterns + no_object
    return {DN_LABEL_EMBED_KEY: label_enc[:-1].clone(), PATTERNS_KEY: patterns}


def convert_dn_detr_state_dict(state_dict: Mapping[str, Tensor]) -> Conversion:
    """Official DN-DETR (DN-DAB-DETR) `checkpoint["model"]` -> our layout (module doc)."""
    rest = dict(state_dict)
    label_enc = rest.pop("label_enc.weight", None)
    patterns = rest.pop("transformer.patterns.weight", None)
    conversion = convert_official_state_dict(rest)
    if label_enc is None:
        return conversion  # not a DN-DETR checkpoint; convert_state_dict says what it looks like
    return conversion._replace(state_dict={**conversion.state_dict,
                                           **_label_embedding(label_enc, patterns, "label_enc.weight")})


def _detrex_key(key: str) -> Optional[str]:
    if key.startswith("backbone."):  # detectron2's ResNet, as ours
        return key
    layer = _DETREX_LAYER.match(key)
    if layer:
        part, index, rest = layer.groups()
        table = _DETREX_ENCODER_LAYER if part == "encoder" else _DETREX_DECODER_LAYER
        for old, new in table.items():
            if rest.startswith(old):
                return f"head.transformer.{part}.layers.{index}.{new}{rest[len(old):]}"
        return None
    for old, new in _DETREX_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _detrex_twin(key: str, state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """The original of a tied copy: `bbox_embed.*` of the decoder's box head (if present, else that is the box
    head), the FFN's `activation` of its second registration `layers.0.1` (always dropped)."""
    if key.startswith("transformer.decoder.bbox_embed."):
        twin = key[len("transformer.decoder."):]
        return twin if twin in state_dict else None
    if _DETREX_PRELU_TWIN.match(key):
        return key.replace("ffns.0.layers.0.1.", "ffns.0.activation.")
    return None


def convert_detrex_dn_detr_state_dict(state_dict: Mapping[str, Tensor]) -> Conversion:
    """detrex `projects/dn_detr` (DNDETR) `checkpoint["model"]` -> our layout (module doc)."""
    rest = dict(state_dict)
    label_encoder = rest.pop(_DETREX_LABEL_ENCODER, None)
    conversion = rename_state_dict(rest, _detrex_key, _detrex_twin, source="detrex")
    if label_encoder is None:
        return conversion
    return conversion._replace(state_dict={**conversion.state_dict,
                                           **_label_embedding(label_encoder, None, _DETREX_LABEL_ENCODER)})
