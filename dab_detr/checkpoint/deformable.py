"""DAB-Deformable-DETR checkpoints (official IDEA-Research/DAB-DETR `models/dab_deformable_detr`, and detrex
`projects/dab_deformable_detr`, single- and two-stage) -> our `DABDeformableDETR` state dict.

Our transformer keeps the official module names, so the official layout maps almost unchanged; detrex's generic
layer containers (`attentions.N`, `ffns.0.layers`, `norms.N`, `neck.convs`) are renamed to them. In both:

- the per-layer heads `class_embed.i` / `bbox_embed.i` are the decoder layers' heads for i < L (L decoder layers);
  with two stages, index L is the proposal head (-> `transformer.enc_class_embed` / `enc_bbox_embed`);
- the box heads are registered a second time as `transformer.decoder.bbox_embed.*` (and, two-stage,
  `transformer.decoder.class_embed.*`): those copies are checked equal to the originals and dropped.

Note the decoder's layer norms: the official `norm2` follows self-attention and `norm1` cross-attention, while
detrex's `norms.0` follows self-attention and `norms.1` cross-attention.
"""
import re
from typing import Callable, Mapping, Optional

from torch import Tensor

from .io import Conversion, rename_state_dict
from .torchvision import torchvision_resnet_key

__all__ = ["convert_deformable_state_dict", "is_deformable_state_dict"]

_DETREX_ENCODER = {"attentions.0": "self_attn", "ffns.0.layers.0.0": "linear1", "ffns.0.layers.1": "linear2",
                   "norms.0": "norm1", "norms.1": "norm2"}
_DETREX_DECODER = {"attentions.0.attn": "self_attn", "attentions.1": "cross_attn", "ffns.0.layers.0.0": "linear1",
                   "ffns.0.layers.1": "linear2", "norms.0": "norm2", "norms.1": "norm1", "norms.2": "norm3"}


def is_deformable_state_dict(keys) -> bool:
    return any(k in ("transformer.level_embed", "transformer.level_embeds") for k in keys)


def _num_decoder_layers(keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _head_key(key: str, num_layers: int) -> Optional[str]:
    """`class_embed.i.*` / `bbox_embed.i.*` -> a decoder layer's head or (i == L) the proposal head."""
    m = re.match(r"(class_embed|bbox_embed)\.(\d+)\.(.*)", key)
    if m is None:
        return None
    name, index, rest = m.group(1), int(m.group(2)), m.group(3)
    if index < num_layers:
        return f"head.class_embed.{index}.{rest}" if name == "class_embed" else \
            f"head.transformer.decoder.bbox_embed.{index}.{rest}"
    if index == num_layers:
        return f"head.transformer.enc_{name}.{rest}"
    return None


def _official_key(key: str) -> Optional[str]:
    if key.startswith("backbone.0.body."):
        return torchvision_resnet_key(key[len("backbone.0.body."):])
    if key.startswith("transformer.pos_trans"):  # the official two-stage query projection: no place in ours
        return None
    for prefix in ("transformer.", "input_proj.", "tgt_embed.", "refpoint_embed.", "patterns_embed."):
        if key.startswith(prefix):
            return "head." + key
    return None


def _detrex_key(key: str, num_convs: int) -> Optional[str]:
    if key.startswith("backbone."):  # detectron2 ResNet already
        return key
    m = re.match(r"neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(.*)", key)
    if m:
        level = int(m.group(2)) + (num_convs if m.group(1) == "extra_convs" else 0)
        return f"head.input_proj.{level}.{0 if m.group(3) == 'conv' else 1}.{m.group(4)}"
    if key == "transformer.level_embeds":
        return "head.transformer.level_embed"
    m = re.match(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.*)", key)
    if m:
        table = _DETREX_ENCODER if m.group(1) == "encoder" else _DETREX_DECODER
        for old in sorted(table, key=len, reverse=True):
            if m.group(3).startswith(old + "."):
                return f"head.transformer.{m.group(1)}.layers.{m.group(2)}.{table[old]}{m.group(3)[len(old):]}"
        return None
    for prefix in ("transformer.decoder.query_scale.", "transformer.decoder.ref_point_head.",
                   "transformer.enc_output.", "transformer.enc_output_norm.", "tgt_embed.", "refpoint_embed."):
        if key.startswith(prefix):
            return "head." + key
    return None


def _tied_head_twin(key: str, state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """The top-level head `{bbox,class}_embed.*` of which `transformer.decoder.{bbox,class}_embed.*` is a copy."""
    m = re.match(r"transformer\.decoder\.((?:bbox|class)_embed\..*)", key)
    return m.group(1) if m and m.group(1) in state_dict else None


def convert_deformable_state_dict(state_dict: Mapping[str, Tensor], flavour: str) -> Conversion:
    """Rename an official (`flavour="official"`) or detrex (`"detrex"`) DAB-Deformable-DETR state dict."""
    if flavour not in ("official", "detrex"):
        raise ValueError(f"flavour must be 'official' or 'detrex', got {flavour!r}")
    num_layers = _num_decoder_layers(state_dict)
    num_convs = len({k.split(".")[2] for k in state_dict if k.startswith("neck.convs.")})
    rename: Callable[[str], Optional[str]] = (
        _official_key if flavour == "official" else (lambda k: _detrex_key(k, num_convs))
    )
    return rename_state_dict(state_dict, lambda k: _head_key(k, num_layers) or rename(k), _tied_head_twin,
                             source=flavour)
