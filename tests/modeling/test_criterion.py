import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dab_detr.modeling.criterion import SetCriterion, sigmoid_focal_loss
from dab_detr.modeling.matcher import HungarianMatcher

LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")


class FixedMatcher(nn.Module):
    """Returns a given matching, so that the losses can be checked independently of the Hungarian solver."""

    def __init__(self, indices):
        super().__init__()
        self.indices = [(torch.tensor(q, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for q, t in indices]

    def forward(self, outputs, targets):
        return self.indices

    def match_layers(self, layers, targets):
        return [self.indices for _ in layers]


def _outputs(batch_size, num_queries, num_classes, num_aux=0, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def layer():
        return {
            "pred_logits": torch.randn(batch_size, num_queries, num_classes, generator=g).requires_grad_(requires_grad),
            "pred_boxes": (torch.rand(batch_size, num_queries, 4, generator=g) * 0.5 + 0.1).requires_grad_(
                requires_grad
            ),
        }

    outputs = layer()
    if num_aux:
        outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    return outputs


def _targets(sizes, num_classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {"labels": torch.randint(num_classes, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.1}
        for n in sizes
    ]


def _focal(logit, y, alpha, gamma):
    """Focal loss of one logit against a {0, 1} label, with Python floats."""
    p = 1 / (1 + math.exp(-logit))
    ce = -math.log(p) if y else -math.log(1 - p)
    p_t = p if y else 1 - p
    alpha_t = alpha if y else 1 - alpha
    return alpha_t * (1 - p_t) ** gamma * ce


def _giou(box, tgt_box):
    """GIoU of two cxcywh boxes, with Python floats."""

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(box), corners(tgt_box)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _reference_losses(outputs, targets, indices, alpha, gamma, weights):
    """The three weighted losses of one layer for a given matching, with explicit loops."""
    logits, boxes = outputs["pred_logits"].tolist(), outputs["pred_boxes"].tolist()
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    matched = {}  # (image, query) -> target index
    for b, (qs, ts) in enumerate(indices):
        for q, t in zip(qs, ts):
            matched[(b, q)] = t
    loss_class = loss_bbox = loss_giou = 0.0
    for b in range(len(logits)):
        for q in range(len(logits[b])):
            t = matched.get((b, q))
            for c in range(len(logits[b][q])):
                y = t is not None and int(targets[b]["labels"][t]) == c
                loss_class += _focal(logits[b][q][c], y, alpha, gamma)
            if t is not None:
                tgt_box = targets[b]["boxes"][t].tolist()
                loss_bbox += sum(abs(p - g) for p, g in zip(boxes[b][q], tgt_box))
                loss_giou += 1 - _giou(boxes[b][q], tgt_box)
    return {
        "loss_class": weights[0] * loss_class / num_boxes,
        "loss_bbox": weights[1] * loss_bbox / num_boxes,
        "loss_giou": weights[2] * loss_giou / num_boxes,
    }


def _keys(num_aux):
    return {name + suffix for name in LOSS_NAMES for suffix in [""] + [f"_{i}" for i in range(num_aux)]}


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.4, 1.5), (-1.0, 2.0)])
def test_sigmoid_focal_loss_equals_formula(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    targets = (torch.rand(2, 3, 4, generator=g) > 0.7).to(torch.float64)
    expected = 0.0
    for x, y in zip(inputs.flatten().tolist(), targets.flatten().tolist()):
        if alpha < 0:  # no class-balance weighting: undo _focal's alpha_t
            expected += _focal(x, y, 0.5, gamma) * 2
        else:
            expected += _focal(x, y, alpha, gamma)
    got = sigmoid_focal_loss(inputs, targets, num_boxes=3.0, alpha=alpha, gamma=gamma)
    assert got.item() == pytest.approx(expected / 3.0, rel=1e-10)


def _old_sigmoid_focal_loss(inputs, targets, num_boxes, alpha, gamma):
    """The focal loss as this repository wrote it before using torchvision's."""
    prob = inputs.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.4, 1.5), (-1.0, 2.0)])
def test_torchvision_focal_loss_equals_the_previous_code(alpha, gamma):
    g = torch.Generator().manual_seed(7)
    inputs = torch.randn(2, 5, 6, generator=g)
    targets = (torch.rand(2, 5, 6, generator=g) > 0.8).float()
    torch.testing.assert_close(
        sigmoid_focal_loss(inputs, targets, 4.0, alpha, gamma),
        _old_sigmoid_focal_loss(inputs, targets, 4.0, alpha, gamma),
    )


def test_elementwise_giou_loss_equals_the_diagonal_of_the_pairwise_giou():
    """The loss of matched pairs only (`box_ops.generalized_box_iou_loss`) against the N x N matrix's diagonal used
    before."""
    from dab_detr.modeling.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, generalized_box_iou_loss

    g = torch.Generator().manual_seed(8)
    src = box_cxcywh_to_xyxy(torch.rand(40, 4, generator=g) * 0.5 + 0.05)
    tgt = box_cxcywh_to_xyxy(torch.rand(40, 4, generator=g) * 0.5 + 0.05)
    old = (1 - torch.diag(generalized_box_iou(src, tgt))).sum()
    # the loss adds eps=1e-7 to the union and the hull (as torchvision's): equal to ~1e-7 relative at these sizes
    torch.testing.assert_close(generalized_box_iou_loss(src, tgt).sum(), old, rtol=1e-5, atol=1e-6)


def test_target_batch_is_checked_once_and_reused_for_every_layer(monkeypatch):
    """A prepared `TargetBatch` goes through the criterion without being collated again, and gives the same losses
    as the per-image dicts."""
    from dab_detr.modeling import targets as targets_module
    from dab_detr.modeling.targets import collate_targets

    outputs = _outputs(2, 5, 3, num_aux=3, seed=9)
    targets = _targets([2, 3], 3, seed=10)
    criterion = SetCriterion(3, HungarianMatcher())
    expected = criterion(outputs, targets)
    batch = collate_targets(targets, 2, 3, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(targets_module, "check_target_batch", lambda *a: calls.append(a))
    got = criterion(outputs, batch)
    assert calls == []
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert [t["labels"].tolist() for t in batch.per_image()] == [t["labels"].tolist() for t in targets]


def test_losses_equal_formulas_for_a_given_matching():
    num_classes = 3
    outputs = _outputs(2, 5, num_classes, seed=2)
    targets = _targets([2, 1], num_classes, seed=3)
    indices = [([3, 0], [1, 0]), ([4], [0])]
    # Non-default weights and focal parameters, so that every one of them is pinned.
    weights = (1.5, 3.0, 0.7)
    criterion = SetCriterion(num_classes, FixedMatcher(indices), *weights, focal_alpha=0.3, focal_gamma=1.5)
    losses = criterion(outputs, targets)
    expected = _reference_losses(outputs, targets, indices, 0.3, 1.5, weights)
    assert set(losses) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert losses[name].dim() == 0
        assert losses[name].item() == pytest.approx(expected[name], rel=1e-5), name


def test_losses_with_hungarian_matching_equal_formulas():
    num_classes = 4
    outputs = _outputs(3, 6, num_classes, seed=4)
    targets = _targets([2, 0, 3], num_classes, seed=5)
    matcher = HungarianMatcher()
    indices = [(q.tolist(), t.tolist()) for q, t in matcher(outputs, targets)]
    losses = SetCriterion(num_classes, matcher)(outputs, targets)
    expected = _reference_losses(outputs, targets, indices, 0.25, 2.0, (1.0, 5.0, 2.0))
    for name in LOSS_NAMES:
        assert losses[name].item() == pytest.approx(expected[name], rel=1e-5), name


def test_aux_losses_are_suffixed_and_matched_per_layer():
    num_classes = 3
    outputs = _outputs(2, 6, num_classes, num_aux=2, seed=6)
    # aux layer 0 = the last layer with its queries reversed: with its own matching its losses equal the last
    # layer's; reusing the last layer's matching would pair the wrong queries.
    outputs["aux_outputs"][0] = {k: outputs[k].flip(1) for k in ("pred_logits", "pred_boxes")}
    targets = _targets([3, 2], num_classes, seed=7)
    criterion = SetCriterion(num_classes, HungarianMatcher())
    losses = criterion(outputs, targets)
    assert set(losses) == _keys(2)
    alone = criterion(outputs["aux_outputs"][1], targets)
    for name in LOSS_NAMES:
        torch.testing.assert_close(losses[name + "_0"], losses[name])
        torch.testing.assert_close(losses[name + "_1"], alone[name])
    assert losses["loss_bbox_0"] != losses["loss_bbox_1"]


def test_encoder_proposals_are_matched_with_the_decoder_layers_and_scored_as_alone():
    """Two-stage: `enc_outputs` gets `loss_*_enc`, the same losses as a criterion call of its own (its own matching),
    from the matcher's one call; and a proposal count other than the decoder's is a clear error."""
    num_classes = 3
    outputs = _outputs(2, 6, num_classes, num_aux=1, seed=8)
    outputs["enc_outputs"] = _outputs(2, 6, num_classes, seed=9)
    targets = _targets([3, 2], num_classes, seed=10)
    matcher = HungarianMatcher()
    calls = []
    match_layers = matcher.match_layers
    matcher.match_layers = lambda layers, t: calls.append(len(layers)) or match_layers(layers, t)
    criterion = SetCriterion(num_classes, matcher)
    losses = criterion(outputs, targets)
    assert calls == [3] and set(losses) == _keys(1) | {name + "_enc" for name in LOSS_NAMES}
    alone = criterion(outputs["enc_outputs"], targets)
    for name in LOSS_NAMES:
        torch.testing.assert_close(losses[name + "_enc"], alone[name])
    outputs["enc_outputs"] = _outputs(2, 5, num_classes, seed=9)
    with pytest.raises(ValueError, match=r"same \(B, Q\)"):
        criterion(outputs, targets)


def test_image_without_targets_gives_finite_losses():
    num_classes = 3
    outputs = _outputs(2, 5, num_classes, num_aux=1, seed=8)
    targets = _targets([0, 2], num_classes, seed=9)
    losses = SetCriterion(num_classes, HungarianMatcher())(outputs, targets)
    assert set(losses) == _keys(1)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[k] > 0 for k in losses)


def test_batch_without_targets_only_pushes_scores_down():
    num_classes = 3
    outputs = _outputs(2, 4, num_classes, num_aux=2, seed=10, requires_grad=True)
    targets = _targets([0, 0], num_classes)
    losses = SetCriterion(num_classes, HungarianMatcher())(outputs, targets)
    assert set(losses) == _keys(2)
    for suffix, layer in [("", outputs), ("_0", outputs["aux_outputs"][0]), ("_1", outputs["aux_outputs"][1])]:
        assert losses["loss_bbox" + suffix].item() == 0 and losses["loss_giou" + suffix].item() == 0
        # num_boxes is clamped to 1: the class loss is the plain all-negative focal sum.
        all_negative = sigmoid_focal_loss(layer["pred_logits"], torch.zeros_like(layer["pred_logits"]), 1.0)
        torch.testing.assert_close(losses["loss_class" + suffix], all_negative)
    sum(losses.values()).backward()
    for layer in [outputs] + outputs["aux_outputs"]:
        assert (layer["pred_logits"].grad > 0).all()  # gradient descent lowers every score
        assert not layer["pred_boxes"].grad.any()


def test_gradients_reach_logits_and_matched_boxes():
    num_classes = 3
    outputs = _outputs(2, 5, num_classes, num_aux=1, seed=11, requires_grad=True)
    targets = _targets([2, 1], num_classes, seed=12)
    matcher = HungarianMatcher()
    losses = SetCriterion(num_classes, matcher)(outputs, targets)
    sum(losses.values()).backward()
    for layer in [outputs] + outputs["aux_outputs"]:
        assert layer["pred_logits"].grad.abs().sum(-1).gt(0).all()  # every query gets a class gradient
        matched = torch.zeros(2, 5, dtype=torch.bool)
        for b, (q, _) in enumerate(matcher(layer, targets)):
            matched[b, q] = True
        box_grad = layer["pred_boxes"].grad.abs().sum(-1)
        assert box_grad[matched].gt(0).all() and not box_grad[~matched].any()


def test_num_boxes_is_batch_total_clamped_to_one():
    criterion = SetCriterion(3, HungarianMatcher())
    assert criterion.get_num_boxes(5, torch.device("cpu")).item() == 5
    assert criterion.get_num_boxes(0, torch.device("cpu")).item() == 1


BAD_INPUTS = {
    "logits width": (lambda o, t: o.update(pred_logits=o["pred_logits"][..., :2]), r"outputs\['pred_logits'\]"),
    "aux logits width": (
        lambda o, t: o["aux_outputs"][1].update(pred_logits=o["aux_outputs"][1]["pred_logits"][..., :2]),
        r"outputs\['aux_outputs'\]\[1\]\['pred_logits'\]",
    ),
    "boxes width": (lambda o, t: o.update(pred_boxes=o["pred_boxes"][..., :3]), r"outputs\['pred_boxes'\]"),
    "label too large": (lambda o, t: t[0]["labels"].fill_(3), r"labels.*\[0, 3\)"),
    "negative label": (lambda o, t: t[1]["labels"].fill_(-1), r"labels.*\[0, 3\)"),
    "float labels": (lambda o, t: t[0].update(labels=t[0]["labels"].float()), r"targets\[0\]\['labels'\]"),
    "negative box size": (lambda o, t: t[1]["boxes"][0, 2].fill_(-0.1), r"targets\[\*\]\['boxes'\]"),
}


@pytest.mark.parametrize("mutate, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_naming_the_field(mutate, match):
    outputs = _outputs(2, 4, 3, num_aux=2)
    targets = _targets([1, 2], 3)
    mutate(outputs, targets)
    with pytest.raises(ValueError, match=match):
        SetCriterion(3, HungarianMatcher())(outputs, targets)


def test_missing_target_field_raises_naming_it():
    targets = _targets([1, 2], 3)
    del targets[1]["boxes"]
    with pytest.raises(KeyError, match="boxes"):
        SetCriterion(3, HungarianMatcher())(_outputs(2, 4, 3), targets)


# ---- num_boxes across workers -------------------------------------------------------------------------


def _num_boxes_worker(rank, world_size, init_file, scenarios, result_dir):
    """Per scenario (number of targets per rank): the local losses, then the all-reduced normaliser and losses."""
    torch.set_num_threads(1)
    criterion = SetCriterion(3, HungarianMatcher())
    outputs = _outputs(1, 6, 3, seed=rank)
    cases = [_targets([sizes[rank]], 3, seed=10 + rank) for sizes in scenarios]
    local = [criterion(outputs, targets) for targets in cases]  # before the group exists: no all-reduce
    # A short timeout: a broken peer must fail the test, not hang it for the default 30 minutes.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        num_boxes = [criterion.get_num_boxes(sizes[rank], torch.device("cpu")).item() for sizes in scenarios]
        reduced = [criterion(outputs, targets) for targets in cases]
    finally:
        dist.destroy_process_group()
    result = {"num_boxes": num_boxes, "local": local, "reduced": reduced}
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))


def test_num_boxes_is_all_reduced_mean_across_workers(tmp_path):
    # Rank 0 holds 1 target and rank 1 holds 4 (mean 2.5); then 0 and 1 (mean 0.5, clamped to 1).
    scenarios = [(1, 4), (0, 1)]
    expected_num_boxes = [2.5, 1.0]
    mp.spawn(_num_boxes_worker, args=(2, str(tmp_path / "store"), scenarios, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["num_boxes"] == pytest.approx(expected_num_boxes)
        cases = zip(scenarios, expected_num_boxes, result["local"], result["reduced"])
        for sizes, global_mean, local, reduced in cases:
            # Same matching, different normaliser: the loss scales by local count / global mean.
            scale = max(sizes[rank], 1) / global_mean
            for name in LOSS_NAMES:
                torch.testing.assert_close(reduced[name], local[name] * scale)


# ---- HuggingFace DAB-DETR loss ---------------------------------------------------------------------------


def test_matches_huggingface_dab_detr_loss(monkeypatch):
    """Same predictions and targets through HF's `DabDetrForObjectDetection` loss and ours.

    What HF does (transformers 5.x, `loss/loss_deformable_detr.py`, mapped to DabDetrForObjectDetection in
    `loss/loss_utils.py::LOSS_MAPPING`):
    - returns *unweighted* per-term losses (`loss_ce`, `loss_bbox`, `loss_giou`, `_i` suffixes, plus a
      `cardinality_error` that is logging only) and a total weighted with {loss_ce: 1 (hard-coded: the config's
      `cls_loss_coefficient`, default 2, is never read), loss_bbox: bbox_loss_coefficient, loss_giou:
      giou_loss_coefficient}. Ours are already weighted, so we compare ours to HF's term times our weight.
    - normalises the focal loss as `loss.mean(1).sum() / num_boxes * num_queries`, i.e. sum / num_boxes like
      ours (equal up to float rounding); L1 and GIoU are sum / num_boxes like ours.
    - its matcher hard-codes focal alpha 0.25 and gamma 2 (ours are arguments; defaults equal), and replaces a
      non-finite cost by the float max where ours raises.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    transformers = pytest.importorskip("transformers")
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

    batch_size, num_queries, num_classes, num_layers = 3, 12, 6, 3
    config = transformers.DabDetrConfig(
        num_labels=num_classes,
        decoder_layers=num_layers,
        auxiliary_loss=True,
        class_cost=2,
        bbox_cost=5,
        giou_cost=2,
        bbox_loss_coefficient=5,
        giou_loss_coefficient=2,
        focal_alpha=0.25,
        use_pretrained_backbone=False,
    )
    g = torch.Generator().manual_seed(20)
    logits = torch.randn(num_layers, batch_size, num_queries, num_classes, generator=g)
    boxes = torch.rand(num_layers, batch_size, num_queries, 4, generator=g) * 0.6 + 0.1
    targets = _targets([4, 0, 7], num_classes, seed=21)
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    hf_loss_fn = loss_utils.LOSS_MAPPING["DabDetrForObjectDetection"]
    hf_total, hf_losses, _ = hf_loss_fn(logits[-1], hf_targets, "cpu", boxes[-1], config, logits, boxes)

    outputs = {
        "pred_logits": logits[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(num_layers - 1)],
    }
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25)
    losses = SetCriterion(num_classes, matcher, loss_class=1.0, loss_bbox=5.0, loss_giou=2.0, focal_alpha=0.25)(
        outputs, targets
    )

    hf_matcher = DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    for layer in range(num_layers):
        ours = matcher({"pred_logits": logits[layer], "pred_boxes": boxes[layer]}, targets)
        theirs = hf_matcher({"logits": logits[layer], "pred_boxes": boxes[layer]}, hf_targets)
        assert len(ours) == len(theirs) == batch_size
        for (q, t), (hq, ht) in zip(ours, theirs):
            assert q.tolist() == hq.tolist() and t.tolist() == ht.tolist()

    weights = {"loss_class": ("loss_ce", 1.0), "loss_bbox": ("loss_bbox", 5.0), "loss_giou": ("loss_giou", 2.0)}
    assert set(losses) == _keys(num_layers - 1)
    for suffix in [""] + [f"_{i}" for i in range(num_layers - 1)]:
        for name, (hf_name, weight) in weights.items():
            torch.testing.assert_close(
                losses[name + suffix], hf_losses[hf_name + suffix] * weight, rtol=1e-5, atol=1e-5
            )
    # HF's loss never reads config.cls_loss_coefficient (default 2): its total equals ours with class weight 1.
    assert config.cls_loss_coefficient == 2
    torch.testing.assert_close(sum(losses.values()), hf_total, rtol=1e-5, atol=1e-5)
