import itertools
import math

import pytest
import torch

from dab_detr.modeling.matcher import HungarianMatcher


def _targets(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes, dtype=torch.float32)}


def _empty_targets():
    return {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


def _random_outputs(batch_size, num_queries, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(batch_size, num_queries, num_classes, generator=g),
        "pred_boxes": torch.rand(batch_size, num_queries, 4, generator=g) * 0.5 + 0.1,
    }


def _random_targets(sizes, num_classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {"labels": torch.randint(num_classes, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.1}
        for n in sizes
    ]


def _pair_cost(logit, box, label, tgt_box, w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25, gamma=2.0):
    """The matching cost of one (query, target) pair, written out with Python floats."""
    p = 1 / (1 + math.exp(-logit[label]))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box, tgt_box))

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = corners(box), corners(tgt_box)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (hull - union) / hull
    return w_class * (pos - neg) + w_bbox * l1 - w_giou * giou


def test_finds_the_obvious_assignment():
    # Query q sits exactly on target perm[q] and is confident in its class; the rest are far off.
    boxes = [[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.1], [0.5, 0.8, 0.3, 0.2]]
    labels = [0, 2, 1]
    perm = [2, 0, 1]
    pred_logits = torch.full((1, 5, 3), -5.0)
    pred_boxes = torch.full((1, 5, 4), 0.05)
    for q, t in enumerate(perm):
        pred_logits[0, q, labels[t]] = 5.0
        pred_boxes[0, q] = torch.tensor(boxes[t])
    outputs = {"pred_logits": pred_logits, "pred_boxes": pred_boxes}
    ((query_idx, target_idx),) = HungarianMatcher()(outputs, [_targets(labels, boxes)])
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {t: q for q, t in enumerate(perm)}


def test_cost_matrix_equals_per_pair_formula():
    num_classes = 4
    outputs = _random_outputs(1, 6, num_classes)
    (tgt,) = _random_targets([3], num_classes)
    # Non-default weights so that each term's weight is pinned.
    matcher = HungarianMatcher(cost_class=1.5, cost_bbox=3.0, cost_giou=0.5, focal_alpha=0.3, focal_gamma=1.5)
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], tgt["labels"], tgt["boxes"])
    assert cost.shape == (6, 3)
    for q in range(6):
        for t in range(3):
            expected = _pair_cost(
                outputs["pred_logits"][0, q].tolist(),
                outputs["pred_boxes"][0, q].tolist(),
                int(tgt["labels"][t]),
                tgt["boxes"][t].tolist(),
                w_class=1.5,
                w_bbox=3.0,
                w_giou=0.5,
                alpha=0.3,
                gamma=1.5,
            )
            assert cost[q, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_assignment_is_optimal_by_brute_force():
    outputs = _random_outputs(1, 5, 3, seed=3)
    (tgt,) = _random_targets([3], 3, seed=4)
    matcher = HungarianMatcher()
    ((query_idx, target_idx),) = matcher(outputs, [tgt])
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], tgt["labels"], tgt["boxes"])
    best = min(sum(cost[q, t].item() for t, q in enumerate(qs)) for qs in itertools.permutations(range(5), 3))
    assert cost[query_idx, target_idx].sum().item() == pytest.approx(best, rel=1e-6)
    assert sorted(target_idx.tolist()) == [0, 1, 2]


def test_batched_matching_equals_per_image_matching():
    sizes = [3, 0, 5, 1]
    outputs = _random_outputs(4, 8, 5, seed=5)
    targets = _random_targets(sizes, 5, seed=6)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for i, (query_idx, target_idx) in enumerate(batched):
        single = {k: v[i : i + 1] for k, v in outputs.items()}
        ((query_ref, target_ref),) = matcher(single, [targets[i]])
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
        assert query_idx.device.type == "cpu"
        assert len(query_idx) == sizes[i]
        torch.testing.assert_close(query_idx, query_ref)
        torch.testing.assert_close(target_idx, target_ref)


def test_more_targets_than_queries_matches_every_query():
    outputs = _random_outputs(1, 2, 3)
    ((query_idx, target_idx),) = HungarianMatcher()(outputs, _random_targets([4], 3))
    assert sorted(query_idx.tolist()) == [0, 1]
    assert len(set(target_idx.tolist())) == 2


def test_image_without_targets_matches_nothing():
    outputs = _random_outputs(2, 4, 3)
    indices = HungarianMatcher()(outputs, [_empty_targets(), _random_targets([2], 3)[0]])
    assert [len(q) for q, _ in indices] == [0, 2]
    assert indices[0][0].dtype == torch.int64 and indices[0][1].dtype == torch.int64


def test_batch_without_any_target_matches_nothing():
    indices = HungarianMatcher()(_random_outputs(3, 4, 3), [_empty_targets()] * 3)
    assert len(indices) == 3
    for query_idx, target_idx in indices:
        assert query_idx.shape == (0,) and query_idx.dtype == torch.int64
        assert target_idx.shape == (0,) and target_idx.dtype == torch.int64


@pytest.mark.parametrize("name, value", [("pred_logits", float("nan")), ("pred_boxes", float("inf"))])
def test_non_finite_predictions_raise_naming_the_output(name, value):
    outputs = _random_outputs(2, 4, 3)
    outputs[name][1, 2, 0] = value
    with pytest.raises(FloatingPointError, match=name):
        HungarianMatcher()(outputs, _random_targets([1, 2], 3))


def test_out_of_range_label_raises():
    targets = [_targets([3], [[0.5, 0.5, 0.2, 0.2]])]
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\)"):
        HungarianMatcher()(_random_outputs(1, 4, 3), targets)


def test_wrong_number_of_target_dicts_raises():
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(_random_outputs(2, 4, 3), _random_targets([1], 3))
