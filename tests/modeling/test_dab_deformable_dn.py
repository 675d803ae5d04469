"""Denoising training (DN-DETR) on DAB-Deformable-DETR: eval unchanged, the mask, DN losses, checkpoints."""

import pytest
import torch

from dab_detr.modeling.criterion import SetCriterion
from dab_detr.modeling.dab_deformable_head import DabDeformableDetrHead
from dab_detr.modeling.matcher import HungarianMatcher
from tests.helpers import (
    assert_dn_checkpoint_loads_into_plain_head, assert_label_embedding_gradient, random_target_batch,
    tiny_multiscale_inputs,
)

NUM_CLASSES = 5
NUM_QUERIES = 7
NUM_DECODER_LAYERS = 3


def _head(dn, two_stage=False, num_queries=NUM_QUERIES, **kwargs) -> DabDeformableDetrHead:
    torch.manual_seed(0)
    return DabDeformableDetrHead(
        [8, 16], num_classes=NUM_CLASSES, hidden_dim=32, num_queries=num_queries, nheads=4, num_encoder_layers=1,
        num_decoder_layers=NUM_DECODER_LAYERS, dim_feedforward=64, num_feature_levels=3, enc_n_points=2,
        dec_n_points=2, two_stage=two_stage, dn=dn, **kwargs,
    )


def _randomised_pair(two_stage=False, **kwargs):
    """(plain, dn) heads with the same random weights (zero-init heads perturbed so every path matters)."""
    plain = _head(False, two_stage, **kwargs)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    dn = _head(True, two_stage, **kwargs)
    dn.load_state_dict(plain.state_dict(), strict=False)  # all but the label embedding
    return plain, dn


def _targets(sizes, seed=0):
    return random_target_batch(sizes, NUM_CLASSES, seed)


def _assert_same_outputs(a, b, equal):
    pairs = [(a, b)] + list(zip(a["aux_outputs"], b["aux_outputs"]))
    assert len(pairs) == NUM_DECODER_LAYERS
    for x, y in pairs:
        for key in ("pred_logits", "pred_boxes"):
            if equal:
                assert torch.equal(x[key], y[key]), key
            else:
                torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-5)


def test_dn_is_off_by_default_and_only_adds_the_label_embedding():
    assert DabDeformableDetrHead([8], num_classes=3, hidden_dim=32, num_feature_levels=1).denoising is None
    plain, dn = _head(False).state_dict(), _head(True).state_dict()
    assert set(dn) - set(plain) == {"denoising.label_embed.weight"}
    assert all(torch.equal(v, dn[k]) for k, v in plain.items())  # same seed, same weights


@pytest.mark.parametrize("two_stage", [False, True])
def test_eval_outputs_are_bitwise_identical_with_dn_on_and_off(two_stage):
    plain, dn = _randomised_pair(two_stage)
    plain.eval(), dn.eval()
    feats, mask = tiny_multiscale_inputs()
    with torch.no_grad():
        a, b = plain(feats, mask), dn(feats, mask, _targets([2, 1]))  # targets are ignored in eval
    _assert_same_outputs(a, b, equal=True)
    assert "dn_outputs" not in b


def test_decoder_self_attention_mask_for_a_small_batch(monkeypatch):
    """Two images with 2 and 1 targets, G = 2 groups of M = 2 slots, then the Q = 7 matching queries."""
    head = _head(True, denoising_groups=2).train()
    seen = {}
    decoder_forward = head.transformer.decoder.forward

    def spy(tgt, reference, *args):
        seen["mask"], seen["queries"] = args[-1], tgt.shape[1]
        return decoder_forward(tgt, reference, *args)

    monkeypatch.setattr(head.transformer.decoder, "forward", spy)
    head(*tiny_multiscale_inputs(), _targets([2, 1]))
    n = 4 + NUM_QUERIES
    expected = torch.zeros(2, n, n, dtype=torch.bool)
    expected[:, :, 4:] = True  # everyone sees the matching queries; matching queries see nothing else
    for b, real in enumerate(([0, 1], [0])):  # real slots of group 0; group 1 is slot + 2
        for group in (0, 2):
            for q in range(group, group + 2):
                expected[b, q, [group + r for r in real]] = True
    assert seen["queries"] == n
    assert torch.equal(seen["mask"], expected[:, None])


@pytest.mark.parametrize("two_stage,num_patterns", [(False, 0), (False, 2), (True, 0)])  # patterns: single-stage
def test_in_training_matching_outputs_do_not_depend_on_the_denoising_queries(two_stage, num_patterns):
    plain, dn = _randomised_pair(two_stage, num_patterns=num_patterns)
    plain.train(), dn.train()
    feats, mask = tiny_multiscale_inputs()
    targets = _targets([3, 1])
    a, b = plain(feats, mask, targets), dn(feats, mask, targets)
    assert b["pred_logits"].shape == (2, NUM_QUERIES * max(num_patterns, 1), NUM_CLASSES)
    assert b["dn_outputs"]["pred_logits"].shape == (2, 5 * 3, NUM_CLASSES)
    assert b["dn_outputs"]["pred_boxes"].shape == (2, 5 * 3, 4)
    assert len(b["dn_outputs"]["aux_outputs"]) == NUM_DECODER_LAYERS - 1
    _assert_same_outputs(a, b, equal=False)
    if two_stage:
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(a["enc_outputs"][key], b["enc_outputs"][key])


def _criterion():
    return SetCriterion(NUM_CLASSES, HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0))


@pytest.mark.parametrize("two_stage", [False, True])
@pytest.mark.parametrize("sizes", [[3, 1], [3, 0], [0, 0]])
def test_dn_losses_on_every_layer_are_finite_also_without_targets(two_stage, sizes):
    head = _head(True, two_stage).train()
    targets = _targets(sizes)
    losses = _criterion()(head(*tiny_multiscale_inputs(), targets), targets)
    dn_keys = {f"loss_{k}_dn{s}" for k in ("class", "bbox", "giou") for s in ("", "_0", "_1")}
    assert dn_keys <= set(losses)
    assert not any(k.startswith("loss_") and k.endswith("_dn_2") for k in losses)  # 2 aux + the last layer
    total = sum(losses.values())
    assert torch.isfinite(total)
    if sum(sizes) == 0:
        assert all(losses[k].item() == 0.0 for k in dn_keys)
    else:
        assert all(losses[k].item() > 0.0 for k in dn_keys)
    total.backward()
    assert_label_embedding_gradient(head, sum(sizes) > 0)


def test_dn_checkpoint_loads_into_the_plain_model_and_drops_the_label_embedding(caplog):
    assert_dn_checkpoint_loads_into_plain_head(_head, caplog)


def test_bad_denoising_groups_is_a_one_line_error():
    with pytest.raises(ValueError, match="DabDeformableDetrHead: denoising_groups"):
        _head(True, denoising_groups=0)


def test_two_stage_with_fewer_tokens_than_queries_masks_the_k_proposals():
    """K = min(num_queries, tokens): 8x10 + 4x5 + 2x3 = 106 proposals for 200 queries; the mask must cover them."""
    head = _head(True, two_stage=True, num_queries=200).train()
    out = head(*tiny_multiscale_inputs(), _targets([2, 1]))
    assert out["pred_logits"].shape == (2, 106, NUM_CLASSES)
    assert out["dn_outputs"]["pred_logits"].shape == (2, 5 * 2, NUM_CLASSES)
