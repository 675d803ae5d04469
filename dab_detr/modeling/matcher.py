"""Hungarian matching between DAB-DETR predictions and ground-truth boxes (DETR, Carion et al. 2020).

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md)."""

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def concat_targets(
    targets: Sequence[Dict[str, Tensor]], batch_size: int, num_classes: int, device: torch.device
) -> Tuple[Tensor, Tensor, List[int]]:
    """Validate per-image targets and concatenate them over the batch.

    Args:
        targets: `batch_size` dicts with "labels" int (n_i,) and "boxes" normalised cxcywh (n_i, 4).
    Returns:
        labels (T,) int64, boxes (T, 4) on `device`, and the per-image sizes [n_0, ..., n_{B-1}].
    """
    if len(targets) != batch_size:
        raise ValueError(f"targets: expected one dict per image ({batch_size}), got {len(targets)}")
    for i, t in enumerate(targets):
        for key in ("labels", "boxes"):
            if key not in t:
                raise KeyError(f"targets[{i}] has no '{key}'")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"targets[{i}]['labels'] must be an integer tensor (n,), got {labels.dtype} {tuple(labels.shape)}"
            )
        if boxes.shape != (labels.shape[0], 4):
            raise ValueError(
                f"targets[{i}]['boxes'] must be ({labels.shape[0]}, 4) to match its labels, got {tuple(boxes.shape)}"
            )
    sizes = [len(t["labels"]) for t in targets]
    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.int64)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)
    if labels.numel() > 0:
        # One host sync for all checks; out-of-range labels would otherwise index out of bounds
        # (a device-side assert on CUDA) and NaN/negative-size boxes would break the GIoU.
        bad_labels = (labels < 0) | (labels >= num_classes)
        bad_boxes = ~(boxes[:, 2:] >= 0).all(-1) | ~torch.isfinite(boxes).all(-1)
        if bool(bad_labels.any() | bad_boxes.any()):
            if bool(bad_labels.any()):
                raise ValueError(
                    f"targets[*]['labels'] must be in [0, {num_classes}), got {labels[bad_labels].unique().tolist()}"
                )
            raise ValueError("targets[*]['boxes'] must be finite normalised cxcywh with w, h >= 0")
    return labels, boxes, sizes


def _empty_match() -> Tuple[Tensor, Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    `cost_class * focal + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)`, per image.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (official: 2, 5, 2).
        focal_alpha, focal_gamma: focal-loss parameters of the class cost (0.25, 2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou can't all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Matching cost of every prediction against every target.

        Args:
            pred_logits (N, C), pred_boxes (N, 4) cxcywh, tgt_labels (T,), tgt_boxes (T, 4) cxcywh.
        Returns:
            (N, T) cost.
        """
        # Only the target classes' columns are needed: gather them before the focal terms.
        prob = pred_logits.sigmoid()[:, tgt_labels]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        cost_class = pos - neg
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: "pred_logits" (B, Q, C) and "pred_boxes" (B, Q, 4) sigmoid-space cxcywh (other keys ignored).
            targets: B dicts with "labels" (n_i,) and "boxes" (n_i, 4) normalised cxcywh.
        Returns:
            per image, (query indices, target indices): int64 CPU tensors of length min(Q, n_i).
        """
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if pred_logits.dim() != 3 or pred_boxes.shape != (*pred_logits.shape[:2], 4):
            raise ValueError(
                f"HungarianMatcher: expected pred_logits (B, Q, C) and pred_boxes (B, Q, 4), "
                f"got {tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}"
            )
        batch_size, num_queries, num_classes = pred_logits.shape
        tgt_labels, tgt_boxes, sizes = concat_targets(targets, batch_size, num_classes, pred_logits.device)
        if tgt_labels.numel() == 0:
            return [_empty_match() for _ in range(batch_size)]

        # Checked before the cost: NaN boxes would otherwise surface as a GIoU error that names no output.
        if not bool(torch.isfinite(pred_logits).all() & torch.isfinite(pred_boxes).all()):
            for name, value in (("pred_logits", pred_logits), ("pred_boxes", pred_boxes)):
                if not bool(torch.isfinite(value).all()):
                    raise FloatingPointError(f"HungarianMatcher: outputs['{name}'] contains NaN or inf")

        # All queries of the batch against all targets of the batch in one op (float32 even under
        # autocast: the assignment must not flip on rounding); the off-diagonal image blocks are dropped.
        cost = self.cost_matrix(
            pred_logits.flatten(0, 1).float(), pred_boxes.flatten(0, 1).float(), tgt_labels, tgt_boxes.float()
        )
        if not bool(torch.isfinite(cost).all()):
            raise FloatingPointError(
                "HungarianMatcher: non-finite matching cost from finite inputs "
                "(a zero-area pred_boxes entry coinciding with a zero-area target box?)"
            )
        cost = cost.view(batch_size, num_queries, -1).cpu()

        indices = []
        for i, cost_i in enumerate(cost.split(sizes, dim=-1)):
            if sizes[i] == 0:
                indices.append(_empty_match())
                continue
            query_idx, target_idx = linear_sum_assignment(cost_i[i].numpy())
            indices.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        return indices
