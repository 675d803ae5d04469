"""HuggingFace `DabDetrForObjectDetection` state dict -> our `DABDETR` state dict.

Handles HF's default timm ResNet backbone (what released HF checkpoints use) and the HF-native `ResNetBackbone`
(`use_timm_backbone=False`); both map onto detectron2's `ResNet` (`backbone.stem`, `backbone.res2..res5`).
"""
import re
from typing import Dict, List, Mapping, NamedTuple

import torch
from torch import Tensor, nn

# timm backbone keys sit under `_backbone.` in current transformers, directly under `model.` in older exports.
_TIMM_PREFIXES = ("model.backbone.conv_encoder.model._backbone.", "model.backbone.conv_encoder.model.")
_HF_RESNET_PREFIX = "model.backbone.conv_encoder.model."

# HF module path -> ours; a key maps by its longest matching prefix, the parameter name is kept.
_TOP_LEVEL = {
    "model.query_refpoint_embeddings": "head.anchor_box_embed",
    "model.input_projection": "head.input_proj",
    "model.patterns": "head.transformer.patterns",
    "model.encoder.query_scale": "head.transformer.encoder.query_scale",
    "model.decoder.layernorm": "head.transformer.decoder.norm",
    "model.decoder.query_scale": "head.transformer.decoder.query_scale",
    "model.decoder.ref_point_head": "head.transformer.decoder.ref_point_head",
    "model.decoder.ref_anchor_head": "head.transformer.decoder.ref_anchor_head",
    "bbox_predictor": "head.transformer.decoder.bbox_embed",
    "class_embed": "head.class_embed",
}
_ENCODER_LAYER = {
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "final_layer_norm": "norm2",
    "fc1": "linear1",
    "fc2": "linear2",
    "activation_fn": "activation",
}
_DECODER_LAYER = {
    "self_attn.self_attn_query_content_proj": "sa_qcontent_proj",
    "self_attn.self_attn_query_pos_proj": "sa_qpos_proj",
    "self_attn.self_attn_key_content_proj": "sa_kcontent_proj",
    "self_attn.self_attn_key_pos_proj": "sa_kpos_proj",
    "self_attn.self_attn_value_proj": "sa_v_proj",
    "self_attn.self_attn.output_proj": "self_attn.out_proj",
    "self_attn.self_attn_layer_norm": "norm1",
    "cross_attn.cross_attn_query_content_proj": "ca_qcontent_proj",
    "cross_attn.cross_attn_query_pos_proj": "ca_qpos_proj",
    "cross_attn.cross_attn_key_content_proj": "ca_kcontent_proj",
    "cross_attn.cross_attn_key_pos_proj": "ca_kpos_proj",
    "cross_attn.cross_attn_value_proj": "ca_v_proj",
    "cross_attn.cross_attn_query_pos_sine_proj": "ca_qpos_sine_proj",
    "cross_attn.cross_attn.output_proj": "cross_attn.out_proj",
    "cross_attn.cross_attn_layer_norm": "norm2",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "mlp.final_layer_norm": "norm3",
    "mlp.activation_fn": "activation",
}
_LAYER_KEY = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")
# timm ResNet (torchvision names) -> detectron2 ResNet, applied after stripping the backbone prefix.
_TIMM_BACKBONE = [
    (re.compile(r"conv1\.weight$"), "backbone.stem.conv1.weight"),
    (re.compile(r"bn1\.(\w+)$"), r"backbone.stem.conv1.norm.\1"),
    (re.compile(r"layer(\d)\.(\d+)\.conv(\d)\.weight$"),
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)$"),
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"layer(\d)\.(\d+)\.downsample\.0\.weight$"),
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (re.compile(r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"),
     lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]
# HF-native ResNetBackbone -> detectron2 ResNet.
_HF_BACKBONE = [
    (re.compile(r"embedder\.embedder\.convolution\.weight$"), "backbone.stem.conv1.weight"),
    (re.compile(r"embedder\.embedder\.normalization\.(\w+)$"), r"backbone.stem.conv1.norm.\1"),
    (re.compile(r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.convolution\.weight$"),
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.weight"),
    (re.compile(r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.normalization\.(\w+)$"),
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm.{m[4]}"),
    (re.compile(r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.convolution\.weight$"),
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.weight"),
    (re.compile(r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)$"),
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.norm.{m[3]}"),
]
_ENCODER_QKV = re.compile(r"model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


class HFConversion(NamedTuple):
    state_dict: Dict[str, Tensor]  # our keys
    unused_keys: List[str]  # HF keys that map to nothing
    ignored_keys: List[str]  # HF keys dropped on purpose (BN counters, the decoder's tied copy of bbox_predictor)


def _convert_backbone_key(key: str):
    """Our key for an HF backbone key, or None if it is not a backbone key we know."""
    if key.startswith(_HF_RESNET_PREFIX + "embedder.") or key.startswith(_HF_RESNET_PREFIX + "encoder."):
        rest, rules = key[len(_HF_RESNET_PREFIX):], _HF_BACKBONE
    else:
        prefix = next((p for p in _TIMM_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return None
        rest, rules = key[len(prefix):], _TIMM_BACKBONE
    for pattern, target in rules:
        m = pattern.match(rest)
        if m:
            return target(m) if callable(target) else m.expand(target)
    return None


def _rename_by_prefix(key: str, table: Mapping[str, str], new_prefix: str = ""):
    for old in sorted(table, key=len, reverse=True):
        if key.startswith(old + "."):
            return new_prefix + table[old] + key[len(old):]
    return None


def _convert_transformer_key(key: str):
    """Our key for an HF key outside the backbone, or None."""
    m = _LAYER_KEY.match(key)
    if m:
        table = _ENCODER_LAYER if m[1] == "encoder" else _DECODER_LAYER
        return _rename_by_prefix(m[3], table, f"head.transformer.{m[1]}.layers.{m[2]}.")
    return _rename_by_prefix(key, _TOP_LEVEL)


def convert_hf_state_dict(hf_state_dict: Mapping[str, Tensor]) -> HFConversion:
    """Rename an HF `DabDetrForObjectDetection` state dict into `DABDETR`'s layout.

    The encoder's separate q/k/v projections are packed into `in_proj_weight`/`in_proj_bias`
    (`nn.MultiheadAttention` layout). `model.decoder.bbox_embed.*` is HF's tied copy of `bbox_predictor.*`:
    it is checked to be equal and dropped. Keys that map to nothing are returned in `unused_keys`.
    """
    out: Dict[str, Tensor] = {}
    unused: List[str] = []
    ignored: List[str] = []
    qkv: Dict[tuple, Dict[str, Tensor]] = {}
    for key, value in hf_state_dict.items():
        if key.endswith("num_batches_tracked"):
            ignored.append(key)
            continue
        if key.startswith("model.decoder.bbox_embed."):
            twin = "bbox_predictor." + key[len("model.decoder.bbox_embed."):]
            if twin in hf_state_dict and not torch.equal(hf_state_dict[twin], value):
                raise ValueError(f"convert_hf_state_dict: {key} differs from {twin}; both boxes heads must be tied")
            (ignored if twin in hf_state_dict else unused).append(key)
            continue
        m = _ENCODER_QKV.match(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        new_key = _convert_backbone_key(key) or _convert_transformer_key(key)
        if new_key is None:
            unused.append(key)
        else:
            out[new_key] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            unused += [f"model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}" for p in sorted(parts)]
            continue
        out[f"head.transformer.encoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return HFConversion(out, unused, ignored)


class HFLoadResult(NamedTuple):
    unused_keys: List[str]  # HF keys that map to nothing
    ignored_keys: List[str]  # HF keys dropped on purpose
    missing_keys: List[str]  # model keys the checkpoint did not provide
    unexpected_keys: List[str]  # converted keys the model does not have
    mismatched_keys: List[str]  # "key: checkpoint shape vs model shape", not loaded


def load_hf_state_dict(model: nn.Module, hf_state_dict: Mapping[str, Tensor], strict: bool = True) -> HFLoadResult:
    """Convert `hf_state_dict` and load it into a `DABDETR` (keys `backbone.*`, `head.*`).

    Like `nn.Module.load_state_dict(strict=True)`, with `strict` it loads what fits and then raises a
    `ValueError` listing every unused HF key, missing or unexpected model key and shape mismatch.
    """
    conversion = convert_hf_state_dict(hf_state_dict)
    expected = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in conversion.state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    loadable = {
        k: v for k, v in conversion.state_dict.items() if k not in expected or v.shape == expected[k].shape
    }
    # The model's own load hooks run here (e.g. the head splits anchors for freeze_anchor_xy).
    loaded = model.load_state_dict(loadable, strict=False)
    result = HFLoadResult(
        conversion.unused_keys, conversion.ignored_keys, list(loaded.missing_keys), list(loaded.unexpected_keys),
        mismatched,
    )
    if strict and (result.unused_keys or result.missing_keys or result.unexpected_keys or result.mismatched_keys):
        raise ValueError(
            "load_hf_state_dict: checkpoint and model do not match: "
            f"HF keys with no destination {result.unused_keys}, model keys not provided {result.missing_keys}, "
            f"converted keys the model lacks {result.unexpected_keys}, shape mismatches {result.mismatched_keys}"
        )
    return result
