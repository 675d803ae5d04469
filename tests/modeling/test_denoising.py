"""Denoising training (DN-DETR): query layout, attention mask, noise, losses, and the head with `dn` on."""
import math

import pytest
import torch

from dab_detr.modeling.box_ops import inverse_sigmoid
from dab_detr.modeling.criterion import SetCriterion
from dab_detr.modeling.dab_detr_head import DabDetrHead
from dab_detr.modeling.denoising import (
    DenoisingGenerator,
    apply_box_noise,
    apply_label_noise,
    denoising_attn_mask,
    denoising_layout,
    denoising_losses,
)
from dab_detr.modeling.matcher import HungarianMatcher
from tests.helpers import (
    assert_dn_checkpoint_loads_into_plain_head, assert_label_embedding_gradient, random_target_batch,
)

SMALL = dict(hidden_dim=32, num_queries=6, nheads=4, num_encoder_layers=1, num_decoder_layers=3, dim_feedforward=64)
NUM_CLASSES = 5


def _targets(sizes, seed=0):
    return random_target_batch(sizes, NUM_CLASSES, seed)


def _head(dn, **kwargs):
    torch.manual_seed(0)
    return DabDetrHead(16, num_classes=NUM_CLASSES, dn=dn, **{**SMALL, **kwargs})


def _features_and_mask(batch=2):
    g = torch.Generator().manual_seed(2)
    features = torch.randn(batch, 16, 4, 5, generator=g)
    mask = torch.zeros(batch, 4, 5, dtype=torch.bool)
    mask[-1, 3:, :] = True
    mask[-1, :, 3:] = True
    return features, mask


# --- layout and mask --------------------------------------------------------------------------------------------


def test_layout_puts_each_images_targets_first_in_every_group():
    layout = denoising_layout([2, 0, 1], groups=2)  # M = 2 slots per group
    assert layout.max_targets == 2 and layout.num_queries == 4
    assert layout.batch_idx.tolist() == [0, 0, 2, 0, 0, 2]
    assert layout.query_idx.tolist() == [0, 1, 0, 2, 3, 2]
    assert layout.target_idx.tolist() == [0, 1, 2, 0, 1, 2]


def test_attention_mask_for_a_small_batch():
    # two groups of M = 2 slots, then Q = 3 matching queries; image 0 has 2 targets, image 1 has 1 (slot 1 and 3 pad)
    mask = denoising_attn_mask([2, 1], groups=2, num_matching=3)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    image0 = [
        [1, 1, 0, 0, 1, 1, 1],  # group 0 sees group 0 and the matching queries
        [1, 1, 0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 1],  # group 1 sees group 1 and the matching queries
        [0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1],  # matching queries see no denoising query
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1],
    ]
    image1 = [
        [1, 0, 0, 0, 1, 1, 1],  # padding slots (1 and 3) are seen by no one
        [1, 0, 0, 0, 1, 1, 1],
        [0, 0, 1, 0, 1, 1, 1],
        [0, 0, 1, 0, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1],
    ]
    assert mask[0, 0].int().tolist() == image0
    assert mask[1, 0].int().tolist() == image1


def test_attention_mask_without_targets_is_the_matching_part_only():
    mask = denoising_attn_mask([0, 0], groups=5, num_matching=4)
    assert mask.shape == (2, 1, 4, 4) and bool(mask.all())


# --- noise ------------------------------------------------------------------------------------------------------


def test_label_noise_replaces_labels_with_the_given_probability():
    labels = torch.zeros(20000, dtype=torch.int64)
    torch.manual_seed(0)
    assert torch.equal(apply_label_noise(labels, 0.0, 10), labels)
    noised = apply_label_noise(labels, 0.2, 10)
    assert 0 <= int(noised.min()) and int(noised.max()) < 10
    # a replaced label is uniform over 10 classes, so 1/10 of replacements keep 0: 0.2 * 0.9 change
    assert (noised != 0).float().mean().item() == pytest.approx(0.18, abs=0.01)


def test_box_noise_moves_centres_by_at_most_scale_half_size_and_scales_sizes_within_bounds():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.1]]).repeat(5000, 1)  # small boxes: no clipping
    noised = apply_box_noise(boxes, 0.4)
    shift = (noised[:, :2] - boxes[:, :2]).abs() / boxes[:, 2:]
    scale = noised[:, 2:] / boxes[:, 2:]
    assert float(shift.max()) <= 0.2 + 1e-6 and float(shift.max()) > 0.19
    assert float(scale.min()) >= 0.6 - 1e-6 and float(scale.max()) <= 1.4 + 1e-6
    assert float(scale.min()) < 0.61 and float(scale.max()) > 1.39


def test_box_noise_is_clipped_to_the_image():
    torch.manual_seed(1)
    noised = apply_box_noise(torch.tensor([[0.95, 0.02, 0.9, 0.9]]).repeat(1000, 1), 0.4)
    assert float(noised.min()) >= 0.0 and float(noised.max()) <= 1.0
    assert float(noised.max()) == 1.0 and float(noised.min()) == 0.0


def test_generator_queries_content_indicator_anchors_and_padding():
    torch.manual_seed(0)
    generator = DenoisingGenerator(NUM_CLASSES, 8, denoising_groups=3, label_noise_prob=0.0, box_noise_scale=0.0)
    targets = _targets([2, 1])
    queries = generator(targets, num_matching=4)
    assert queries.content.shape == (2, 6, 8) and queries.anchors.shape == (2, 6, 4)
    assert queries.attn_mask.shape == (2, 1, 10, 10)
    real = torch.zeros(2, 6, dtype=torch.bool)
    real[queries.layout.batch_idx, queries.layout.query_idx] = True
    assert real.sum().item() == 3 * 3
    assert torch.equal(queries.content[..., -1], real.float())  # indicator bit 1 on denoising queries, padding 0
    assert not queries.content[~real].any() and not queries.anchors[~real].any()
    expected = generator.label_embed.weight[targets.labels[queries.layout.target_idx]]  # no noise here
    got = queries.content[queries.layout.batch_idx, queries.layout.query_idx]
    torch.testing.assert_close(got[:, :-1], expected)
    got_anchors = queries.anchors[queries.layout.batch_idx, queries.layout.query_idx]
    torch.testing.assert_close(got_anchors, inverse_sigmoid(targets.boxes[queries.layout.target_idx]))


def test_noise_is_seeded_by_torch_global_generator():
    generator = DenoisingGenerator(NUM_CLASSES, 8)
    targets = _targets([3, 2])

    def draw(seed):
        torch.manual_seed(seed)
        return generator(targets, num_matching=4)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.content, b.content) and torch.equal(a.anchors, b.anchors)
    assert not torch.equal(a.anchors, c.anchors)


# --- losses -----------------------------------------------------------------------------------------------------


def _focal(x, y, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    p_t, alpha_t = (p, alpha) if y else (1 - p, 1 - alpha)
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


def _giou(a, b):
    def corners(box):
        return box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(a), corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def test_dn_losses_equal_the_formulas_on_every_layer():
    groups, sizes = 2, [2, 1]
    targets = _targets(sizes)
    layout = denoising_layout(sizes, groups)
    g = torch.Generator().manual_seed(3)

    def layer():
        return {"pred_logits": torch.randn(2, 4, NUM_CLASSES, generator=g, dtype=torch.float64),
                "pred_boxes": torch.rand(2, 4, 4, generator=g, dtype=torch.float64) * 0.4 + 0.1}

    outputs = {**layer(), "aux_outputs": [layer(), layer()]}
    num_boxes = torch.tensor(3.0)
    losses = denoising_losses(outputs, layout, targets, num_boxes, 1.0, 5.0, 2.0)
    assert set(losses) == {f"loss_{n}_dn{s}" for n in ("class", "bbox", "giou") for s in ("", "_0", "_1")}

    for suffix, out in [("", outputs), ("_0", outputs["aux_outputs"][0]), ("_1", outputs["aux_outputs"][1])]:
        cls = l1 = giou = 0.0
        # the real slots: image 0 -> slots 0, 1 (group 0) and 2, 3 (group 1); image 1 -> slots 0 and 2
        for image, slot, target in [(0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 1), (1, 0, 2), (1, 2, 2)]:
            logits, box = out["pred_logits"][image, slot].tolist(), out["pred_boxes"][image, slot].tolist()
            label, tgt = int(targets.labels[target]), targets.boxes[target].tolist()
            cls += sum(_focal(x, c == label) for c, x in enumerate(logits))
            l1 += sum(abs(p - t) for p, t in zip(box, tgt))
            giou += 1 - _giou(box, tgt)
        norm = groups * 3.0  # groups x targets
        assert losses["loss_class_dn" + suffix].item() == pytest.approx(cls / norm, rel=1e-6)
        assert losses["loss_bbox_dn" + suffix].item() == pytest.approx(5.0 * l1 / norm, rel=1e-6)
        assert losses["loss_giou_dn" + suffix].item() == pytest.approx(2.0 * giou / norm, rel=1e-6)


# --- the head with dn on ----------------------------------------------------------------------------------------


def test_eval_outputs_are_bitwise_identical_with_dn_on_and_off():
    plain, dn = _head(False).eval(), _head(True).eval()
    assert set(dn.state_dict()) - set(plain.state_dict()) == {"denoising.label_embed.weight"}
    dn.load_state_dict(plain.state_dict(), strict=False)  # all but the label embedding
    features, mask = _features_and_mask()
    with torch.no_grad():
        a, b = plain(features, mask), dn(features, mask, _targets([2, 1]))  # targets are ignored in eval
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    for x, y in zip(a["aux_outputs"], b["aux_outputs"]):
        assert torch.equal(x["pred_logits"], y["pred_logits"]) and torch.equal(x["pred_boxes"], y["pred_boxes"])
    assert "dn_outputs" not in b


def test_same_seed_builds_the_same_weights_with_dn_on_and_off():
    plain, dn = _head(False).state_dict(), _head(True).state_dict()
    assert all(torch.equal(v, dn[k]) for k, v in plain.items())


@pytest.mark.parametrize("num_patterns", [0, 2])
def test_in_training_the_matching_queries_do_not_see_the_denoising_queries(num_patterns):
    plain, dn = _head(False, num_patterns=num_patterns).train(), _head(True, num_patterns=num_patterns).train()
    dn.load_state_dict(plain.state_dict(), strict=False)
    features, mask = _features_and_mask()
    targets = _targets([3, 1])
    torch.manual_seed(0)
    a, b = plain(features, mask, targets), dn(features, mask, targets)
    q = SMALL["num_queries"] * max(num_patterns, 1)
    assert b["pred_logits"].shape == (2, q, NUM_CLASSES)
    assert b["dn_outputs"]["pred_logits"].shape == (2, 5 * 3, NUM_CLASSES)
    assert len(b["dn_outputs"]["aux_outputs"]) == SMALL["num_decoder_layers"] - 1
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_denoising_groups_do_not_see_each_other_nor_other_images_padding():
    head = _head(True, denoising_groups=2).train()
    features, mask = _features_and_mask()
    torch.manual_seed(0)
    queries = head.denoising(_targets([2, 1]), SMALL["num_queries"])
    src = head.input_proj(features)
    pos = head.position_embedding(mask)

    def run(content):
        hs, _ = head.transformer(src, mask, pos, head.anchor_boxes(), content, queries.anchors, queries.attn_mask)
        return hs

    changed = queries.content.clone()
    changed[:, 2:4] += 1.0  # group 1 (slots 2, 3)
    changed[1, 1] += 5.0  # a padding slot of image 1 in group 0
    a, b = run(queries.content), run(changed)
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0])  # group 0's real queries unchanged
    torch.testing.assert_close(a[:, 0, 1], b[:, 0, 1])
    torch.testing.assert_close(a[:, :, 4:], b[:, :, 4:])  # matching queries unchanged
    assert not torch.allclose(a[:, :, 2:4], b[:, :, 2:4])


def _criterion():
    return SetCriterion(NUM_CLASSES, HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0))


@pytest.mark.parametrize("sizes", [[3, 0], [0, 0]])
def test_images_without_targets_train_with_finite_losses(sizes):
    head = _head(True).train()
    targets = _targets(sizes)
    torch.manual_seed(0)
    losses = _criterion()(head(*_features_and_mask(), targets), targets)
    assert {"loss_class_dn", "loss_bbox_dn", "loss_giou_dn", "loss_giou_dn_1"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert_label_embedding_gradient(head, sum(sizes) > 0)


def test_dn_checkpoint_loads_into_the_plain_model_and_drops_the_label_embedding(caplog):
    assert_dn_checkpoint_loads_into_plain_head(_head, caplog)
