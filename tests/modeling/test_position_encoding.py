import math

import pytest
import torch

from dab_detr.modeling.position_encoding import PositionEmbeddingSine, anchor_sine_embed, sine_embed


def _reference_features(value: float, num_pos_feats: int, temperature: float) -> torch.Tensor:
    """[sin(v / t_0), cos(v / t_0), sin(v / t_1), ...], t_i = T ** (2 i / F), written out by hand."""
    feats = []
    for i in range(num_pos_feats // 2):
        t = temperature ** (2 * i / num_pos_feats)
        feats += [math.sin(value / t), math.cos(value / t)]
    return torch.tensor(feats)


def test_sine_embed_interleaves_sin_and_cos_per_frequency():
    out = sine_embed(torch.tensor([[0.3]]), num_pos_feats=8, temperature=100.0, scale=2.0)
    torch.testing.assert_close(out[0], _reference_features(0.6, 8, 100.0))


def test_sine_embed_uses_one_temperature_per_coordinate():
    out = sine_embed(torch.tensor([0.2, 0.7]), num_pos_feats=6, temperature=(20.0, 10.0), scale=1.0)
    torch.testing.assert_close(out[:6], _reference_features(0.2, 6, 20.0))
    torch.testing.assert_close(out[6:], _reference_features(0.7, 6, 10.0))


def test_sine_embed_rejects_odd_feature_count_and_wrong_temperature_count():
    with pytest.raises(ValueError, match="num_pos_feats"):
        sine_embed(torch.zeros(1, 2), 5)
    with pytest.raises(ValueError, match="temperatures"):
        sine_embed(torch.zeros(1, 2), 4, temperature=(1.0, 2.0, 3.0))


def test_anchor_sine_embed_order_is_y_x_w_h_with_temperature_10000_and_scale_2pi():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # x, y, w, h
    out = anchor_sine_embed(box, num_pos_feats=4)
    assert out.shape == (1, 16)
    for block, value in enumerate([0.2, 0.1, 0.3, 0.4]):  # y, x, w, h
        torch.testing.assert_close(out[0, 4 * block : 4 * block + 4], _reference_features(2 * math.pi * value, 4, 1e4))


def test_anchor_sine_embed_of_points_is_y_then_x():
    out = anchor_sine_embed(torch.tensor([0.25, 0.75]), num_pos_feats=128)
    assert out.shape == (256,)
    torch.testing.assert_close(out[:128], sine_embed(torch.tensor([0.75]), 128, 10000.0))
    torch.testing.assert_close(out[128:], sine_embed(torch.tensor([0.25]), 128, 10000.0))


def test_anchor_sine_embed_rejects_other_coordinate_counts():
    with pytest.raises(ValueError, match="2 or 4"):
        anchor_sine_embed(torch.zeros(5, 3))


def test_image_position_embedding_formula_with_distinct_h_and_w_temperatures():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = PositionEmbeddingSine(num_pos_feats=4, temperature_h=20, temperature_w=7)(mask)
    assert pos.shape == (1, 8, 2, 3)
    eps = 1e-6
    for i in range(2):
        for j in range(3):
            y = (i + 1) / (2 + eps) * 2 * math.pi  # normalised cumulative count, no -0.5 offset
            x = (j + 1) / (3 + eps) * 2 * math.pi
            torch.testing.assert_close(pos[0, :4, i, j], _reference_features(y, 4, 20.0))
            torch.testing.assert_close(pos[0, 4:, i, j], _reference_features(x, 4, 7.0))


def test_image_position_embedding_normalises_by_each_images_own_size():
    padded = torch.ones(1, 6, 8, dtype=torch.bool)
    padded[0, :4, :5] = False
    embed = PositionEmbeddingSine(num_pos_feats=16)
    alone = embed(torch.zeros(1, 4, 5, dtype=torch.bool))
    torch.testing.assert_close(embed(padded)[..., :4, :5], alone)


def test_image_position_embedding_matches_huggingface():
    hf = pytest.importorskip("transformers.models.dab_detr.modeling_dab_detr")
    from transformers import DabDetrConfig

    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    mask[0, :5, :7] = False
    mask[1, :3, :4] = False
    config = DabDetrConfig(use_pretrained_backbone=False, hidden_size=32, temperature_height=20, temperature_width=10)
    expected = hf.DabDetrSinePositionEmbedding(config)(torch.zeros(2, 1, 5, 7), (~mask).long())
    ours = PositionEmbeddingSine(num_pos_feats=16, temperature_h=20, temperature_w=10)(mask)
    torch.testing.assert_close(ours, expected)


def test_anchor_sine_embed_matches_huggingface():
    hf = pytest.importorskip("transformers.models.dab_detr.modeling_dab_detr")
    boxes = torch.rand(2, 7, 4)
    torch.testing.assert_close(anchor_sine_embed(boxes, 64), hf.encode_sinusoidal_position_embedding(boxes, 64))


def test_image_position_embedding_rejects_non_bool_mask():
    with pytest.raises(ValueError, match="bool"):
        PositionEmbeddingSine()(torch.zeros(1, 2, 2))
