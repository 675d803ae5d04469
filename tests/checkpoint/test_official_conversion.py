"""Official DAB-DETR checkpoints (key layout from reference/*.tsv) -> our DABDETR, exactly."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from dab_detr.checkpoint.classes import coco_thing_ids
from dab_detr.checkpoint.convert import convert_state_dict
from dab_detr.checkpoint.official import convert_official_state_dict
from official_reference import R50_DC5_3PATTERNS_TSV, R50_TSV, official_state_dict

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models")
VARIANTS = {
    "r50": (R50_TSV, "dab_detr_r50"),
    "r50_dc5_3patterns": (R50_DC5_3PATTERNS_TSV, "dab_detr_r50_dc5_3patterns"),
}


def our_model(config_name: str, num_classes: int = 80):
    cfg = LazyConfig.load(os.path.join(CONFIGS, config_name + ".py"))
    cfg.model.num_classes = num_classes
    cfg.model.criterion = None
    return instantiate(cfg.model)


@pytest.fixture(scope="module")
def official_r50():
    return official_state_dict(VARIANTS["r50"][0])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    tsv, config = VARIANTS[request.param]
    return request.param, official_state_dict(tsv), config


def test_every_official_key_is_consumed_and_the_result_loads_strictly(variant):
    _, official, config = variant
    conversion = convert_state_dict("official", official)
    assert conversion.unused_keys == []
    # the only keys dropped are the 6 tensors of the decoder's tied copy of bbox_embed
    assert sorted(conversion.ignored_keys) == sorted(k for k in official if k.startswith("transformer.decoder.bbox"))
    assert len(conversion.state_dict) == len(official) - 6
    model = our_model(config)
    model.load_state_dict(conversion.state_dict, strict=True)  # nothing missing, nothing left over
    assert set(model.state_dict()) == set(conversion.state_dict)


def test_tensors_land_where_they_belong(variant):
    name, official, config = variant
    model = our_model(config)
    model.load_state_dict(convert_state_dict("official", official).state_dict, strict=True)
    ours = model.state_dict()
    d = 256
    # encoder self-attention: packed [Wq; Wk; Wv] as nn.MultiheadAttention; our attention reads q from the first d rows
    packed = official["transformer.encoder.layers.3.self_attn.in_proj_weight"]
    attn = model.head.transformer.encoder.layers[3].self_attn
    for i in range(3):
        torch.testing.assert_close(attn.in_proj_weight[i * d:(i + 1) * d], packed[i * d:(i + 1) * d], rtol=0, atol=0)
    torch.testing.assert_close(attn.in_proj_bias, official["transformer.encoder.layers.3.self_attn.in_proj_bias"])
    # conditional cross-attention: ca_qpos_proj exists in layer 0 only
    layer0, layer1 = model.head.transformer.decoder.layers[0], model.head.transformer.decoder.layers[1]
    assert torch.equal(layer0.ca_qpos_proj.weight, official["transformer.decoder.layers.0.ca_qpos_proj.weight"])
    assert layer1.ca_qpos_proj is None
    assert torch.equal(layer1.ca_qpos_sine_proj.bias, official["transformer.decoder.layers.1.ca_qpos_sine_proj.bias"])
    assert torch.equal(layer1.norm3.weight, official["transformer.decoder.layers.1.norm3.weight"])
    # anchors, box head, backbone
    assert torch.equal(model.head.anchor_boxes(), official["refpoint_embed.weight"])
    assert torch.equal(model.head.bbox_embed.layers[2].weight, official["bbox_embed.layers.2.weight"])
    assert torch.equal(ours["backbone.stem.conv1.norm.running_var"], official["backbone.0.body.bn1.running_var"])
    assert torch.equal(ours["backbone.res5.2.conv3.norm.bias"], official["backbone.0.body.layer4.2.bn3.bias"])
    shortcut = official["backbone.0.body.layer2.0.downsample.0.weight"]
    assert torch.equal(ours["backbone.res3.0.shortcut.weight"], shortcut)
    assert torch.equal(ours["backbone.res4.5.conv2.weight"], official["backbone.0.body.layer3.5.conv2.weight"])
    if name == "r50_dc5_3patterns":
        assert torch.equal(model.head.transformer.patterns.weight, official["transformer.patterns.weight"])


def test_91_coco_ids_become_detectron2s_80_contiguous_classes(official_r50):
    official = dict(official_r50)
    state = convert_state_dict("official", official).state_dict
    ids = coco_thing_ids()
    assert len(ids) == 80 and ids[:3] == [1, 2, 3] and ids[11:13] == [13, 14] and ids[-1] == 90  # 12 is unused
    weight, bias = state["head.class_embed.weight"], state["head.class_embed.bias"]
    assert weight.shape == (80, 256) and bias.shape == (80,)
    for contiguous, coco_id in [(0, 1), (11, 13), (79, 90)]:  # person, stop sign (id 13 after the gap), toothbrush
        assert torch.equal(weight[contiguous], official["class_embed.weight"][coco_id])
        assert torch.equal(bias[contiguous], official["class_embed.bias"][coco_id])


def test_custom_class_ids_and_keeping_all_logits(official_r50):
    official = dict(official_r50)
    state = convert_state_dict("official", official, class_ids=[18, 1]).state_dict
    assert torch.equal(state["head.class_embed.weight"], official["class_embed.weight"][[18, 1]])
    state = convert_state_dict("official", official, class_ids="all").state_dict
    assert torch.equal(state["head.class_embed.bias"], official["class_embed.bias"])
    model = our_model("dab_detr_r50", num_classes=91)
    model.load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match=r"\[91\] are outside"):
        convert_state_dict("official", official, class_ids=[0, 91])


def test_frozen_xy_model_takes_the_official_anchors_split(official_r50):
    official = dict(official_r50)
    cfg = LazyConfig.load(os.path.join(CONFIGS, "dab_detr_r50.py"))
    cfg.model.criterion = None
    cfg.model.head.freeze_anchor_xy = True
    model = instantiate(cfg.model)
    model.load_state_dict(convert_state_dict("official", official).state_dict, strict=True)
    assert torch.equal(model.head.anchor_xy, official["refpoint_embed.weight"][:, :2])
    assert torch.equal(model.head.anchor_wh, official["refpoint_embed.weight"][:, 2:])


def test_unknown_keys_are_reported_and_untied_box_heads_refused(official_r50):
    official = dict(official_r50)
    official["mask_head.lay1.weight"] = torch.zeros(1)
    assert convert_official_state_dict(official).unused_keys == ["mask_head.lay1.weight"]
    official["transformer.decoder.bbox_embed.layers.0.bias"] = official["bbox_embed.layers.0.bias"] + 1
    with pytest.raises(ValueError, match="tied"):
        convert_official_state_dict(official)
