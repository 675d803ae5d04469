import math

import pytest
import torch

from dab_detr.modeling.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_loss,
    inverse_sigmoid,
)


def test_cxcywh_to_xyxy_known_value():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def test_box_conversions_round_trip():
    torch.manual_seed(0)
    cxcywh = torch.rand(2, 7, 4)  # leading batch dims are allowed
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)


def test_box_area_is_zero_for_degenerate_boxes():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 0.5, 2.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 0.0]))


def test_box_iou_returns_iou_and_union():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou, union = box_iou(a, b)
    torch.testing.assert_close(union, torch.tensor([[7.0]]))
    torch.testing.assert_close(iou, torch.tensor([[1.0 / 7.0]]))


def test_giou_of_identical_boxes_is_one():
    torch.manual_seed(0)
    boxes = box_cxcywh_to_xyxy(torch.rand(5, 4) * 0.5 + 0.1)
    torch.testing.assert_close(torch.diag(generalized_box_iou(boxes, boxes)), torch.ones(5))


def test_giou_of_disjoint_boxes_is_negative_with_hull_penalty():
    # iou 0, union 2, enclosing hull [0, 3] x [0, 1] has area 3: GIoU = 0 - (3 - 2) / 3.
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)
    torch.testing.assert_close(giou, torch.tensor([[-1.0 / 3.0]]))


def test_giou_of_overlapping_boxes():
    # inter 1, union 7, hull 9: GIoU = 1/7 - (9 - 7) / 9.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[1.0 / 7.0 - 2.0 / 9.0]]))


@pytest.mark.parametrize("bad", [[0.5, 0.0, 0.4, 1.0], [0.0, float("nan"), 1.0, 1.0]])
def test_giou_rejects_inverted_or_nan_boxes(bad):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="inverted"):
        generalized_box_iou(good, torch.tensor([bad]))
    with pytest.raises(ValueError, match="inverted"):
        generalized_box_iou(torch.tensor([bad]), good)


def test_inverse_sigmoid_clamps_at_zero_and_one():
    # Official formula log(x.clamp(eps) / (1 - x).clamp(eps)): at x = 0 only the numerator is clamped,
    # so the limit is -log(1 / eps) (not -log((1 - eps) / eps)); out-of-range inputs clamp to [0, 1] first.
    eps = 1e-3
    limit = math.log(1 / eps)
    x = torch.tensor([0.0, 1.0, -0.5, 1.5], dtype=torch.float64)
    expected = torch.tensor([-limit, limit, -limit, limit], dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(x, eps=eps), expected)
    # The default eps is the official 1e-3 (HF uses 1e-5).
    torch.testing.assert_close(inverse_sigmoid(x), expected)
    limit_hf = math.log(1 / 1e-5)
    torch.testing.assert_close(
        inverse_sigmoid(torch.tensor([1.0], dtype=torch.float64), eps=1e-5),
        torch.tensor([limit_hf], dtype=torch.float64),
    )


def test_inverse_sigmoid_inverts_sigmoid_inside_the_clamp():
    logits = torch.linspace(-5, 5, 11, dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(logits.sigmoid()), logits)


# ---- library ops pinned against the formulas they replaced ------------------------------------------------------
def _old_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _old_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def _old_generalized_box_iou(boxes1, boxes2):
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def test_box_convert_equals_the_previous_formulas():
    g = torch.Generator().manual_seed(3)
    cxcywh = torch.rand(3, 9, 4, generator=g)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), _old_cxcywh_to_xyxy(cxcywh), rtol=0, atol=0)
    xyxy = _old_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), _old_xyxy_to_cxcywh(xyxy), rtol=0, atol=0)


def test_torchvision_giou_equals_the_previous_formula():
    from torchvision.ops import generalized_box_iou as tv_giou

    g = torch.Generator().manual_seed(4)
    a = box_cxcywh_to_xyxy(torch.rand(11, 4, generator=g) * 0.5 + 0.05)
    b = box_cxcywh_to_xyxy(torch.rand(7, 4, generator=g) * 0.5 + 0.05)
    torch.testing.assert_close(tv_giou(a, b), _old_generalized_box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), _old_generalized_box_iou(a, b))


def test_giou_loss_of_pairs_equals_torchvisions_values_and_gradients():
    """Same values and gradients as `torchvision.ops.generalized_box_iou_loss`: overlapping, disjoint, touching,
    identical, nested and zero-area pairs, with leading batch dimensions."""
    from torchvision.ops import generalized_box_iou_loss as torchvision_loss

    g = torch.Generator().manual_seed(0)
    corner = torch.rand(2, 300, 2, generator=g)
    boxes1 = torch.cat([corner, corner + torch.rand(2, 300, 2, generator=g) * 0.5], -1)
    corner = torch.rand(2, 300, 2, generator=g)
    boxes2 = torch.cat([corner, corner + torch.rand(2, 300, 2, generator=g) * 0.5], -1)
    boxes2[:, :5] = boxes1[:, :5]  # identical
    boxes2[:, 5:10, :2] = boxes1[:, 5:10, 2:]  # touching at a corner
    boxes2[:, 5:10, 2:] = boxes1[:, 5:10, 2:] + 0.1
    quarter = (boxes1[:, 10:15, 2:] - boxes1[:, 10:15, :2]) / 4  # nested: the middle half of boxes1
    boxes2[:, 10:15] = torch.cat([boxes1[:, 10:15, :2] + quarter, boxes1[:, 10:15, 2:] - quarter], -1)
    boxes1[:, 15:20, 2:] = boxes1[:, 15:20, :2]  # zero area
    ours = boxes1.clone().requires_grad_()
    theirs = boxes1.clone().requires_grad_()
    loss = generalized_box_iou_loss(ours, boxes2)
    expected = torchvision_loss(theirs.flatten(0, 1), boxes2.flatten(0, 1)).view(2, 300)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert (loss[:, :5].abs() < 1e-4).all() and (loss[:, 20:] > 0).all() and (loss <= 2).all()
    weights = torch.rand(loss.shape, generator=g)
    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
