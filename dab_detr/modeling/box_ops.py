"""Box utilities. Boxes are `(..., 4)` tensors, either `(cx, cy, w, h)` or `(x0, y0, x1, y1)`.

Conversions and the pairwise (generalized) IoU are torchvision's (`torchvision.ops`); this module adds the checks,
a GIoU loss of matched pairs that reads nothing back to the host, and the inverse sigmoid of the DAB-DETR anchor
update.
"""
import torch
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.ops import generalized_box_iou as _generalized_box_iou


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def box_area(boxes: Tensor) -> Tensor:
    """Area of `(..., 4)` xyxy boxes; degenerate boxes have area 0."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor):
    """Pairwise IoU and union of xyxy boxes `(N, 4)` x `(M, 4)` -> `(N, M)`, `(N, M)`.

    (torchvision's `box_iou` returns no union; the synthetic data generator reads both.)
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes `(N, 4)` x `(M, 4)` -> `(N, M)`.

    Inverted boxes (x1 < x0) are an error: they come from non-finite or corrupted predictions. The check costs a
    host sync; the matcher and the criterion skip it (their targets are checked once per step, their predictions
    are sigmoid cxcywh, and a non-finite cost is caught on the matcher's one copy to the host).
    """
    if not torch.compiler.is_compiling() and not (
        bool((boxes1[:, 2:] >= boxes1[:, :2]).all()) and bool((boxes2[:, 2:] >= boxes2[:, :2]).all())
    ):
        raise ValueError("generalized_box_iou: got inverted or non-finite boxes (x1 < x0 or y1 < y0)")
    return _generalized_box_iou(boxes1, boxes2)


def generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of paired xyxy boxes `(..., 4)` and `(..., 4)` -> `(...)`: the loss of matched pairs.

    The same values as torchvision's `generalized_box_iou_loss(..., reduction="none")` (same `eps`), but the
    intersection is clamped instead of gathered through a boolean mask: torchvision's masks cost a host-device sync
    each on an accelerator, ten per training step with the backward.
    """
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    union = area1 + area2 - inter
    enclosing = torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])
    area_c = enclosing[..., 0] * enclosing[..., 1]
    return 1 - (inter / (union + eps) - (area_c - union) / (area_c + eps))


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1-x clamped to >= eps (official eps: 1e-3)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
