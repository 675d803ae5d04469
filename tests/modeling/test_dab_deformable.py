"""DAB-Deformable-DETR model core: parameter counts, padding, gradient flow, two-stage, options."""
import os
import re

import pytest
import torch

from dab_detr.modeling.dab_deformable_head import DabDeformableDetrHead
from dab_detr.modeling.deformable_transformer import encoder_reference_points, valid_ratios
from tests.helpers import tiny_multiscale_inputs

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoint", "reference")


def tiny_head(two_stage=False, **kwargs) -> DabDeformableDetrHead:
    torch.manual_seed(0)
    return DabDeformableDetrHead(
        [8, 16], num_classes=5, hidden_dim=32, num_queries=7, nheads=4, num_encoder_layers=2,
        num_decoder_layers=3, dim_feedforward=64, num_feature_levels=3, enc_n_points=2, dec_n_points=3,
        two_stage=two_stage, **kwargs,
    )


def _randomise(module, scale=0.2):
    with torch.no_grad():  # leave the zero-init heads and offsets, so every path matters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _tsv_params(name):
    with open(os.path.join(REFERENCE, name)) as f:
        header = f.readline()
    return int(re.search(r"(\d+) parameters", header).group(1))


@pytest.mark.parametrize(
    "tsv,num_classes,two_stage",
    [
        ("official_dab_deformable_detr_r50_state_dict.tsv", 91, False),
        ("detrex_dab_deformable_detr_r50_state_dict.tsv", 80, False),
        ("detrex_dab_deformable_detr_r50_two_stage_state_dict.tsv", 80, True),
    ],
)
def test_r50_parameter_count_equals_the_reference_models(tsv, num_classes, two_stage):
    from detectron2.modeling.backbone import BasicStem, ResNet

    from dab_detr.meta_arch import resnet_stages

    backbone = ResNet(BasicStem(3, 64, norm="FrozenBN"), resnet_stages(50), out_features=["res3", "res4", "res5"])
    head = DabDeformableDetrHead([512, 1024, 2048], num_classes=num_classes, two_stage=two_stage)
    total = sum(p.numel() for m in (backbone, head) for p in m.parameters())
    assert total == _tsv_params(tsv)


def test_valid_ratios_and_encoder_reference_points():
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 3:] = True
    mask[1, :, 3:] = True
    ratios = valid_ratios([mask])
    torch.testing.assert_close(ratios, torch.tensor([[[1.0, 1.0]], [[0.5, 0.75]]]))
    ref = encoder_reference_points([(4, 6)], ratios)  # (B, 24, 1, 2): cell centres of the padded map
    torch.testing.assert_close(ref[1, 0, 0], torch.tensor([0.5 / 6, 0.5 / 4]))
    torch.testing.assert_close(ref[0, 7, 0], torch.tensor([1.5 / 6, 1.5 / 4]))


@pytest.mark.parametrize("two_stage", [False, True])
def test_junk_in_padded_cells_of_every_level_does_not_move_outputs(two_stage):
    head = tiny_head(two_stage).eval()
    _randomise(head)
    feats, mask = tiny_multiscale_inputs()
    srcs, masks, pos = head.level_features(feats, mask)
    tgt_anchor = () if two_stage else head.queries()
    ref = head.transformer(srcs, masks, pos, *tgt_anchor)
    junk = [s + 1e3 * torch.randn_like(s) * m[:, None] for s, m in zip(srcs, masks)]
    assert all(m[1].any() for m in masks)  # image 1 has padding on every level
    out = head.transformer(junk, masks, pos, *tgt_anchor)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-4, rtol=1e-4, msg=key)


def test_an_images_outputs_do_not_depend_on_the_rest_of_the_batch():
    head = tiny_head().eval()
    _randomise(head)
    feats, mask = tiny_multiscale_inputs()
    both = head(feats, mask)
    alone = head([f[1:] for f in feats], mask[1:])
    torch.testing.assert_close(alone["pred_boxes"][0], both["pred_boxes"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone["pred_logits"][0], both["pred_logits"][1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_what_trains_and_references_are_detached():
    head = tiny_head()
    _randomise(head)
    feats, mask = tiny_multiscale_inputs()
    out = head(feats, mask)
    out["pred_boxes"].sum().backward(retain_graph=True)
    # the last layer's box sees earlier refinements only as detached references
    for i in range(2):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.bbox_embed[i].parameters())
    assert head.bbox_embed[2].layers[-1].weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)
    loss = sum(o["pred_logits"].sum() + o["pred_boxes"].sum() for o in [out] + out["aux_outputs"])
    loss.backward()
    no_grad = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_two_stage_queries_are_detached_proposals_trained_by_the_encoder_loss():
    head = tiny_head(two_stage=True)
    _randomise(head)
    feats, mask = tiny_multiscale_inputs()
    out = head(feats, mask)
    assert out["enc_outputs"]["pred_logits"].shape == (2, 7, 5) and out["enc_outputs"]["pred_boxes"].shape == (2, 7, 4)
    assert not hasattr(head, "tgt_embed") and not hasattr(head, "refpoint_embed")
    enc_heads = [head.transformer.enc_output, head.transformer.enc_class_embed, head.transformer.enc_bbox_embed]
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward(retain_graph=True)
    assert all(p.grad is None for m in enc_heads for p in m.parameters())  # decoder inputs are detached
    (out["enc_outputs"]["pred_logits"].sum() + out["enc_outputs"]["pred_boxes"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in enc_heads for p in m.parameters())


def test_two_stage_picks_valid_cells_with_the_best_scores():
    head = tiny_head(two_stage=True).eval()
    _randomise(head)
    feats, mask = tiny_multiscale_inputs()
    srcs, masks, pos = head.level_features(feats, mask)
    memory, flat_mask, shapes, _ = head.transformer.encode(srcs, masks, pos)
    output_memory, prior_logits = head.transformer.proposals(memory, flat_mask, shapes)
    assert torch.isinf(prior_logits[flat_mask]).all()
    scores = head.transformer.enc_class_embed(output_memory).max(-1)[0]
    out = head.transformer(srcs, masks, pos)
    best = scores.topk(7, dim=1)[1]
    expected = torch.gather(head.transformer.enc_class_embed(output_memory), 1, best[..., None].expand(-1, -1, 5))
    torch.testing.assert_close(out["enc_logits"], expected)


def test_patterns_repeat_the_anchors_pattern_major():
    head = tiny_head(num_patterns=2)
    tgt, anchors = head.queries()
    assert tgt.shape == (14, 32) and anchors.shape == (14, 4)
    torch.testing.assert_close(anchors[7:], anchors[:7])
    torch.testing.assert_close(tgt[8] - tgt[1], head.patterns_embed.weight[1] - head.patterns_embed.weight[0])
    feats, mask = tiny_multiscale_inputs()
    assert head(feats, mask)["pred_boxes"].shape == (2, 14, 4)


def test_init_follows_deformable_detr_box_refinement():
    head = tiny_head()
    torch.testing.assert_close(head.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert all(m.layers[-1].weight.abs().sum() == 0 for m in head.bbox_embed)
    assert head.class_embed[0].bias.allclose(torch.full((5,), -4.59512), atol=1e-4)
    two = tiny_head(two_stage=True)
    assert all(m.layers[-1].bias.abs().sum() == 0 for m in two.bbox_embed)


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(dec_n_points=0), "dec_n_points"),
        (dict(enc_n_points=0), "enc_n_points"),
        (dict(two_stage=True, num_patterns=2), "num_patterns"),
        (dict(two_stage=True, random_refpoints_xy=True), "random_refpoints_xy"),
        (dict(hidden_dim=48), "hidden_dim"),
        (dict(num_feature_levels=1), "num_feature_levels"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_option(kwargs, option):
    args = dict(num_classes=5, hidden_dim=32, nheads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=option) as err:
        DabDeformableDetrHead([8, 16], **args)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_compiled_inference_gives_the_same_outputs():
    head = tiny_head().eval()
    _randomise(head)
    feats, mask = tiny_multiscale_inputs()
    with torch.no_grad():
        eager = head(feats, mask)
        compiled = torch.compile(head)(feats, mask)
    torch.testing.assert_close(compiled["pred_logits"], eager["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled["pred_boxes"], eager["pred_boxes"], atol=1e-4, rtol=1e-4)


def test_level_position_encoding_uses_pixel_centres():
    """Deformable DETR's normalised sine PE: row i of an unpadded h-row map encodes (i + 0.5) / h * 2 pi."""
    head = tiny_head()
    mask = torch.zeros(1, 4, 5, dtype=torch.bool)
    pos = head.position_embedding(mask)  # (1, 32, 4, 5): 16 y channels, then 16 x channels
    rows = (torch.arange(4, dtype=torch.float32) + 0.5) / 4 * 2 * torch.pi
    torch.testing.assert_close(pos[0, 0, :, 0], rows.sin(), atol=1e-5, rtol=0)  # first y channel: sin(y / 1)
    cols = (torch.arange(5, dtype=torch.float32) + 0.5) / 5 * 2 * torch.pi
    torch.testing.assert_close(pos[0, 17, 0, :], cols.cos(), atol=1e-5, rtol=0)  # second x channel: cos(x / 1)


def test_extra_queries_kept_apart_by_the_self_attention_mask():
    """The decoder takes batched extra queries (e.g. denoising groups) and a self-attention mask that hides them
    from the matching queries: those then give the same outputs as without the extra queries."""
    head = tiny_head().eval()
    _randomise(head)
    feats, mask = tiny_multiscale_inputs()
    srcs, masks, pos = head.level_features(feats, mask)
    tgt, anchors = head.queries()
    plain = head.transformer(srcs, masks, pos, tgt, anchors)
    extra = 4
    g = torch.Generator().manual_seed(5)
    all_tgt = torch.cat((torch.randn(extra, 32, generator=g), tgt))[None].expand(2, -1, -1)
    all_anchors = torch.cat((torch.randn(extra, 4, generator=g), anchors))[None].expand(2, -1, -1)
    n = extra + tgt.shape[0]
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[extra:, :extra] = False  # matching queries do not see the extra ones
    out = head.transformer(srcs, masks, pos, all_tgt, all_anchors, self_attn_mask=allowed)
    torch.testing.assert_close(out["boxes"][:, :, extra:], plain["boxes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["hs"][:, :, extra:], plain["hs"], atol=1e-5, rtol=1e-5)
