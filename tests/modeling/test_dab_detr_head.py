import math

import pytest
import torch

from dab_detr.modeling.dab_detr_head import DabDetrHead

SMALL = dict(hidden_dim=32, num_queries=12, nheads=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64)


def _head(**kwargs) -> DabDetrHead:
    torch.manual_seed(0)
    return DabDetrHead(16, **{"num_classes": 5, **SMALL, **kwargs})


def _features_and_mask():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 16, 4, 5, generator=g)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 3:] = True
    return features, mask


def test_outputs_for_last_layer_and_auxiliary_layers():
    out = _head()(*_features_and_mask())
    assert out["pred_logits"].shape == (2, 12, 5) and out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 2
    assert all(a["pred_logits"].shape == (2, 12, 5) and a["pred_boxes"].shape == (2, 12, 4) for a in out["aux_outputs"])
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_without_aux_loss_the_last_layer_is_unchanged():
    features, mask = _features_and_mask()
    with_aux, without = _head(), _head(aux_loss=False, bbox_embed_diff_each_layer=False)
    without.load_state_dict(with_aux.state_dict())
    a, b = with_aux(features, mask), without(features, mask)
    assert "aux_outputs" not in b
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


def test_patterns_multiply_the_queries():
    out = _head(num_patterns=3)(*_features_and_mask())
    assert out["pred_logits"].shape == (2, 36, 5)


def test_padded_feature_cells_do_not_change_the_outputs():
    head = _head().eval()
    features, mask = _features_and_mask()
    changed = features.clone()
    changed[1][:, mask[1]] = 100.0
    with torch.no_grad():
        a, b = head(features, mask), head(changed, mask)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
    changed[1][:, ~mask[1]] += 1.0  # whereas the real cells do
    with torch.no_grad():
        assert not torch.allclose(head(changed, mask)["pred_logits"], a["pred_logits"])


def test_head_init():
    head = _head(prior_prob=0.01)
    torch.testing.assert_close(head.class_embed.bias, torch.full((5,), -math.log(99.0)))
    assert not head.bbox_embed.layers[-1].weight.any() and not head.bbox_embed.layers[-1].bias.any()
    per_layer = _head(bbox_embed_diff_each_layer=True)
    assert all(not mlp.layers[-1].weight.any() for mlp in per_layer.bbox_embed)
    # zero-init box head: every layer's box is its reference box, so the output is the anchor
    out = _head()(*_features_and_mask())
    torch.testing.assert_close(out["pred_boxes"][0], _head().anchor_boxes().sigmoid(), atol=2e-3, rtol=0)


def test_anchor_inits():
    spread = _head(num_queries=300, anchor_init="spread").anchor_boxes().sigmoid()
    assert spread[:, :2].min() >= 0.05 - 1e-6 and spread[:, :2].max() <= 0.95 + 1e-6
    assert spread[:, 2:].min() >= 0.1 - 1e-6 and spread[:, 2:].max() <= 0.4 + 1e-6
    xy = _head(num_queries=300, random_refpoints_xy=True).anchor_boxes().sigmoid()[:, :2]
    assert xy.min() < 0.05 and xy.max() > 0.95  # U(0, 1), not clustered at the centre
    default = _head(num_queries=300).anchor_boxes()
    assert 0.8 < default.std() < 1.2  # N(0, 1) logits, as nn.Embedding


def test_frozen_anchor_xy_get_no_gradient_and_do_not_move_under_weight_decay():
    head = _head(freeze_anchor_xy=True, anchor_init="spread")
    assert "anchor_xy" in dict(head.named_buffers()) and "anchor_xy" not in dict(head.named_parameters())
    xy_before, wh_before = head.anchor_xy.clone(), head.anchor_wh.detach().clone()
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(2):
        out = head(*_features_and_mask())
        loss = out["pred_boxes"].sum() + sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
        optimizer.zero_grad()
        loss.backward()
        assert head.anchor_wh.grad.abs().sum() > 0
        optimizer.step()
    assert torch.equal(head.anchor_xy, xy_before)
    assert not torch.equal(head.anchor_wh.detach(), wh_before)


def test_anchor_xy_train_when_not_frozen():
    head = _head()
    head(*_features_and_mask())["aux_outputs"][0]["pred_boxes"].sum().backward()  # layer 0 boxes = anchors + delta
    assert head.anchor_box_embed.weight.grad[:, :2].abs().sum() > 0


def test_anchor_layouts_load_into_each_other():
    free, frozen = _head(), _head(freeze_anchor_xy=True, anchor_init="spread")
    frozen.load_state_dict(free.state_dict())
    torch.testing.assert_close(frozen.anchor_boxes(), free.anchor_boxes())
    other = _head(anchor_init="spread")
    other.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(other.anchor_boxes(), free.anchor_boxes())


def test_in_channels_can_be_given_later():
    head = DabDetrHead(num_classes=5, **SMALL)
    with pytest.raises(RuntimeError, match="in_channels"):
        head(*_features_and_mask())
    head.build_input_proj(16)
    assert head(*_features_and_mask())["pred_logits"].shape == (2, 12, 5)


def test_mask_must_match_the_features():
    features, mask = _features_and_mask()
    with pytest.raises(ValueError, match="mask shape"):
        _head()(features, mask[:, :3])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"hidden_dim": 30, "nheads": 3}, "hidden_dim"),
        ({"nheads": 5}, "nheads"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "tanh"}, "activation"),
        ({"num_patterns": -1}, "num_patterns"),
        ({"query_scale_type": "elewise"}, "query_scale_type"),
        ({"anchor_init": "grid"}, "anchor_init"),
        ({"anchor_init": "spread", "random_refpoints_xy": True}, "random_refpoints_xy"),
        ({"prior_prob": 0.0}, "prior_prob"),
        ({"inverse_sigmoid_eps": 0.0}, "inverse_sigmoid_eps"),
        ({"num_queries": 0}, "num_queries"),
    ],
)
def test_bad_arguments_are_named_in_the_error(bad, match):
    with pytest.raises(ValueError, match=match):
        _head(**bad)
