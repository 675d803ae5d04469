"""Official / detrex DAB-Deformable-DETR and detrex DAB-DETR checkpoints (key layouts from reference/*.tsv) -> ours."""
import ast
import os
import re

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from dab_detr.checkpoint.classes import coco_thing_ids
from dab_detr.checkpoint.convert import convert_state_dict, guess_source

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "..", "configs", "models")

# reference key list, source, our model config, two-stage
VARIANTS = {
    "official_deformable": ("official_dab_deformable_detr_r50_state_dict.tsv", "official", "dab_deformable_detr_r50",
                            False),
    "detrex_deformable": ("detrex_dab_deformable_detr_r50_state_dict.tsv", "detrex", "dab_deformable_detr_r50", False),
    "detrex_two_stage": ("detrex_dab_deformable_detr_r50_two_stage_state_dict.tsv", "detrex", "dab_deformable_detr_r50",
                         True),
    "detrex_dab_detr": ("detrex_dab_detr_r50_state_dict.tsv", "detrex", "dab_detr_r50", False),
}
# the same module registered twice in the peers' models: (copy, original)
TIED = [
    (re.compile(r"transformer\.decoder\.((?:bbox|class)_embed\..*)"), r"\1"),
    (re.compile(r"(transformer\.(?:en|de)coder\.layers\.\d+\.ffns\.0\.)activation\.(.*)"), r"\1layers.0.1.\2"),
]


def reference_state_dict(tsv_name: str, seed: int = 0):
    """Random tensors with exactly the listed keys and shapes; tied copies equal their originals."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    with open(os.path.join(HERE, "reference", tsv_name)) as f:
        for line in f:
            if line.startswith(("#", "key\t")) or not line.strip():
                continue
            key, shape = line.rstrip("\n").split("\t")
            state[key] = torch.randn(ast.literal_eval(shape), generator=g)
    for key in state:
        for pattern, original in TIED:
            if pattern.fullmatch(key) and pattern.sub(original, key) in state:
                state[key] = state[pattern.sub(original, key)].clone()
    return state


def tied_copies(state):
    return sorted(k for k in state for p, o in TIED if p.fullmatch(k) and p.sub(o, k) in state)


def our_model(config_name: str, two_stage: bool, num_classes: int):
    cfg = LazyConfig.load(os.path.join(CONFIGS, config_name + ".py"))
    cfg.model.num_classes = num_classes
    cfg.model.criterion = None
    if two_stage:
        cfg.model.head.two_stage = True
    return instantiate(cfg.model)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request):
    tsv, source, config, two_stage = VARIANTS[request.param]
    state = reference_state_dict(tsv)
    return request.param, state, convert_state_dict(source, state, class_ids="all"), config, two_stage


def test_every_key_is_used_or_a_dropped_tied_copy_and_the_result_loads_strictly(converted):
    name, state, conversion, config, two_stage = converted
    assert conversion.unused_keys == []
    assert sorted(conversion.ignored_keys) == tied_copies(state) and conversion.ignored_keys
    assert len(conversion.state_dict) == len(state) - len(conversion.ignored_keys)
    num_classes = conversion.state_dict["head.class_embed.0.weight" if "deformable" in name or "two" in name
                                        else "head.class_embed.weight"].shape[0]
    model = our_model(config, two_stage, num_classes)
    model.load_state_dict(conversion.state_dict, strict=True)
    # every converted tensor is a source tensor, once
    sources = {id(v) for v in state.values()}
    assert all(id(v) in sources for v in conversion.state_dict.values())
    assert len({id(v) for v in conversion.state_dict.values()}) == len(conversion.state_dict)


def test_the_source_is_recognised():
    for tsv, source, _, _ in VARIANTS.values():
        assert guess_source(reference_state_dict(tsv)) == source


# (variant, source key, our key): the renames that are not the identity under "head."
LANDINGS = [
    ("official_deformable", "backbone.0.body.layer1.0.conv1.weight", "backbone.res2.0.conv1.weight"),
    ("official_deformable", "transformer.level_embed", "head.transformer.level_embed"),
    ("official_deformable", "transformer.decoder.layers.2.norm2.weight",
     "head.transformer.decoder.layers.2.norm2.weight"),
    ("official_deformable", "bbox_embed.5.layers.2.bias", "head.transformer.decoder.bbox_embed.5.layers.2.bias"),
    ("official_deformable", "class_embed.4.weight", "head.class_embed.4.weight"),
    ("official_deformable", "input_proj.3.0.weight", "head.input_proj.3.0.weight"),
    ("official_deformable", "refpoint_embed.weight", "head.refpoint_embed.weight"),
    ("detrex_deformable", "neck.convs.2.norm.bias", "head.input_proj.2.1.bias"),
    ("detrex_deformable", "neck.extra_convs.0.conv.weight", "head.input_proj.3.0.weight"),
    ("detrex_deformable", "transformer.level_embeds", "head.transformer.level_embed"),
    ("detrex_deformable", "transformer.encoder.layers.1.attentions.0.sampling_offsets.weight",
     "head.transformer.encoder.layers.1.self_attn.sampling_offsets.weight"),
    ("detrex_deformable", "transformer.encoder.layers.1.norms.1.weight",
     "head.transformer.encoder.layers.1.norm2.weight"),
    ("detrex_deformable", "transformer.decoder.layers.3.attentions.0.attn.in_proj_weight",
     "head.transformer.decoder.layers.3.self_attn.in_proj_weight"),
    ("detrex_deformable", "transformer.decoder.layers.3.attentions.1.value_proj.bias",
     "head.transformer.decoder.layers.3.cross_attn.value_proj.bias"),
    ("detrex_deformable", "transformer.decoder.layers.3.norms.0.weight",
     "head.transformer.decoder.layers.3.norm2.weight"),
    ("detrex_deformable", "transformer.decoder.layers.3.norms.1.weight",
     "head.transformer.decoder.layers.3.norm1.weight"),
    ("detrex_deformable", "transformer.decoder.layers.3.ffns.0.layers.1.weight",
     "head.transformer.decoder.layers.3.linear2.weight"),
    ("detrex_deformable", "backbone.res4.2.conv2.weight", "backbone.res4.2.conv2.weight"),
    ("detrex_two_stage", "class_embed.6.bias", "head.transformer.enc_class_embed.bias"),
    ("detrex_two_stage", "bbox_embed.6.layers.1.weight", "head.transformer.enc_bbox_embed.layers.1.weight"),
    ("detrex_two_stage", "transformer.enc_output_norm.weight", "head.transformer.enc_output_norm.weight"),
    ("detrex_dab_detr", "transformer.encoder.layers.0.ffns.0.layers.0.1.weight",
     "head.transformer.encoder.layers.0.activation.weight"),
    ("detrex_dab_detr", "transformer.decoder.layers.0.attentions.0.key_pos_proj.bias",
     "head.transformer.decoder.layers.0.sa_kpos_proj.bias"),
    ("detrex_dab_detr", "transformer.decoder.layers.0.attentions.1.query_pos_sine_proj.weight",
     "head.transformer.decoder.layers.0.ca_qpos_sine_proj.weight"),
    ("detrex_dab_detr", "transformer.decoder.layers.4.attentions.1.out_proj.weight",
     "head.transformer.decoder.layers.4.cross_attn.out_proj.weight"),
    ("detrex_dab_detr", "transformer.decoder.layers.4.norms.1.bias", "head.transformer.decoder.layers.4.norm2.bias"),
    ("detrex_dab_detr", "transformer.decoder.post_norm_layer.weight", "head.transformer.decoder.norm.weight"),
    ("detrex_dab_detr", "bbox_embed.layers.2.weight", "head.transformer.decoder.bbox_embed.layers.2.weight"),
    ("detrex_dab_detr", "anchor_box_embed.weight", "head.anchor_box_embed.weight"),
]


@pytest.mark.parametrize("variant,source_key,our_key", LANDINGS, ids=lambda x: str(x)[-40:])
def test_tensors_land_where_they_belong(variant, source_key, our_key):
    tsv, source, _, _ = VARIANTS[variant]
    state = reference_state_dict(tsv)
    out = convert_state_dict(source, state, class_ids="all").state_dict
    assert torch.equal(out[our_key], state[source_key])


def test_official_91_ids_become_80_classes_in_every_classifier():
    state = reference_state_dict(VARIANTS["official_deformable"][0])
    out = convert_state_dict("official", state).state_dict
    ids = coco_thing_ids()
    for i in range(6):
        assert torch.equal(out[f"head.class_embed.{i}.weight"], state[f"class_embed.{i}.weight"][ids])
        assert torch.equal(out[f"head.class_embed.{i}.bias"], state[f"class_embed.{i}.bias"][ids])


def test_an_untied_copy_is_an_error():
    state = reference_state_dict(VARIANTS["detrex_deformable"][0])
    state["transformer.decoder.bbox_embed.2.layers.0.bias"] = state["bbox_embed.2.layers.0.bias"] + 1
    with pytest.raises(ValueError, match="bbox_embed.2"):
        convert_state_dict("detrex", state)
