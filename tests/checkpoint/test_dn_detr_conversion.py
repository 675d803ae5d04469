"""DN-DETR checkpoints (official IDEA-Research/DN-DETR and detrex dn_detr; random tensors with their exact key
layouts) -> our DN-DAB-DETR config, and into the same model with dn off (inference)."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from dab_detr.checkpoint.classes import coco_thing_ids
from dab_detr.checkpoint.convert import convert_state_dict, guess_source
from official_reference import DETREX_R50_TSV, R50_TSV, official_state_dict

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "dn_dab_detr_r50_50ep.py")


def dn_model(dn: bool = True):
    cfg = LazyConfig.load(CONFIG)
    cfg.model.criterion = None
    cfg.model.head.dn = dn
    return instantiate(cfg.model)


@pytest.fixture(scope="module")
def official():
    """Official DN-DAB-DETR R50: the DAB-DETR layout (91 raw COCO ids) + `label_enc` (92 rows, hidden_dim - 1)."""
    state = official_state_dict(R50_TSV)
    state["label_enc.weight"] = torch.randn(92, 255, generator=torch.Generator().manual_seed(1))
    return state


@pytest.fixture(scope="module")
def detrex():
    """detrex dn_detr R50: detrex's DAB-DETR layout (80 classes) + `denoising_generator.label_encoder` (81 rows)."""
    state = official_state_dict(DETREX_R50_TSV)
    state["denoising_generator.label_encoder.weight"] = torch.randn(81, 255, generator=torch.Generator().manual_seed(1))
    return state


def test_sources_are_recognised(official, detrex):
    assert guess_source(official) == "dn_detr"
    assert guess_source(detrex) == "detrex_dn_detr"


def test_official_dn_detr_loads_strictly_and_the_label_embedding_lands_where_it_belongs(official):
    conversion = convert_state_dict("dn_detr", official)
    assert conversion.unused_keys == []
    model = dn_model()
    model.load_state_dict(conversion.state_dict, strict=True)
    label_enc = official["label_enc.weight"]
    # rows of the 80 COCO thing ids, as the classifier's
    assert torch.equal(model.head.denoising.label_embed.weight, label_enc[coco_thing_ids()])
    assert torch.equal(model.head.class_embed.bias, official["class_embed.bias"][coco_thing_ids()])
    # the "no object" row (index 91 = num_classes) with indicator 0 is every matching query's content
    patterns = model.head.transformer.patterns.weight
    assert patterns.shape == (1, 256)
    assert torch.equal(patterns[0, :255], label_enc[91]) and patterns[0, 255] == 0


def test_detrex_dn_detr_loads_strictly_with_every_tensor_in_place(detrex):
    conversion = convert_state_dict("detrex_dn_detr", detrex)
    assert conversion.unused_keys == []
    # dropped on purpose: the decoder's tied copy of bbox_embed (6) and the twin PReLU of every FFN (12)
    assert len(conversion.ignored_keys) == 6 + 12
    model = dn_model()
    model.load_state_dict(conversion.state_dict, strict=True)
    ours = model.state_dict()
    pairs = {
        "transformer.encoder.layers.2.attentions.0.attn.in_proj_weight":
            "head.transformer.encoder.layers.2.self_attn.in_proj_weight",
        "transformer.encoder.layers.2.ffns.0.layers.1.weight": "head.transformer.encoder.layers.2.linear2.weight",
        "transformer.encoder.layers.2.norms.1.bias": "head.transformer.encoder.layers.2.norm2.bias",
        "transformer.decoder.layers.0.attentions.1.query_pos_proj.weight":
            "head.transformer.decoder.layers.0.ca_qpos_proj.weight",
        "transformer.decoder.layers.4.attentions.0.key_pos_proj.bias":
            "head.transformer.decoder.layers.4.sa_kpos_proj.bias",
        "transformer.decoder.layers.4.attentions.1.query_pos_sine_proj.weight":
            "head.transformer.decoder.layers.4.ca_qpos_sine_proj.weight",
        "transformer.decoder.layers.4.attentions.1.out_proj.weight":
            "head.transformer.decoder.layers.4.cross_attn.out_proj.weight",
        "transformer.decoder.layers.4.ffns.0.activation.weight": "head.transformer.decoder.layers.4.activation.weight",
        "transformer.decoder.layers.4.norms.2.weight": "head.transformer.decoder.layers.4.norm3.weight",
        "transformer.decoder.post_norm_layer.weight": "head.transformer.decoder.norm.weight",
        "anchor_box_embed.weight": "head.anchor_box_embed.weight",
        "bbox_embed.layers.2.weight": "head.transformer.decoder.bbox_embed.layers.2.weight",
        "backbone.res4.3.conv2.weight": "backbone.res4.3.conv2.weight",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(ours[mine], detrex[theirs]), mine
    label_encoder = detrex["denoising_generator.label_encoder.weight"]
    assert torch.equal(model.head.denoising.label_embed.weight, label_encoder[:80])
    assert torch.equal(model.head.transformer.patterns.weight[0, :255], label_encoder[80])


@pytest.mark.parametrize("source", ["dn_detr", "detrex_dn_detr"])
def test_converted_dn_checkpoint_loads_for_inference_into_the_model_with_dn_off(source, official, detrex):
    state = convert_state_dict(source, official if source == "dn_detr" else detrex).state_dict
    state = {k: v * 0.05 for k, v in state.items()}  # N(0, 1) weights everywhere overflow; N(0, 0.05^2) do not
    plain, trained = dn_model(dn=False).eval(), dn_model(dn=True).eval()
    plain.load_state_dict(state, strict=True)  # the label embedding is dropped with a log line
    trained.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 2048, 3, 4, generator=g)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    with torch.no_grad():
        a, b = plain.head(features, mask), trained.head(features, mask)
    assert torch.isfinite(a["pred_logits"]).all()
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_official_patterns_add_to_the_no_object_content(official):
    # DN-DETR adds each pattern embedding to the "no object" content of the matching queries
    state = dict(official, **{"transformer.patterns.weight": torch.randn(3, 256)})
    patterns = convert_state_dict("dn_detr", state).state_dict["head.transformer.patterns.weight"]
    no_object = torch.cat((official["label_enc.weight"][91], torch.zeros(1)))
    torch.testing.assert_close(patterns, state["transformer.patterns.weight"] + no_object, rtol=0, atol=0)
