"""Hungarian matching between DAB-DETR predictions and ground-truth boxes (DETR, Carion et al. 2020).

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md)."""

from typing import Dict, List, Sequence, Tuple, Union

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from .targets import TargetBatch, collate_targets

Indices = List[Tuple[Tensor, Tensor]]


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
        # Unchecked GIoU: sigmoid cxcywh predictions and checked targets cannot be inverted; NaN shows in the cost.
        pred_xyxy, tgt_xyxy = box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        cost_giou = -generalized_box_iou(pred_xyxy, tgt_xyxy)
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def match_layers(self, layers: Sequence[Dict[str, Tensor]], targets: TargetBatch) -> List[Indices]:
        """Match several decoder layers' predictions at once: one cost computation and one copy to the host.

        Args:
            layers: L dicts with "pred_logits" (B, Q, C) and "pred_boxes" (B, Q, 4) sigmoid-space cxcywh.
            targets: the batch's checked targets.
        Returns:
            per layer, per image, (query indices, target indices): int64 CPU tensors of length min(Q, n_i).
        """
        for layer in layers:
            pred_logits, pred_boxes = layer["pred_logits"], layer["pred_boxes"]
            if pred_logits.dim() != 3 or pred_boxes.shape != (*pred_logits.shape[:2], 4):
                raise ValueError(
                    f"HungarianMatcher: expected pred_logits (B, Q, C) and pred_boxes (B, Q, 4), "
                    f"got {tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}"
                )
        batch_size, num_queries, _ = layers[0]["pred_logits"].shape
        if any(layer["pred_logits"].shape[:2] != (batch_size, num_queries) for layer in layers):
            raise ValueError(
                f"HungarianMatcher: all layers matched at once need the same (B, Q), got "
                f"{[tuple(layer['pred_logits'].shape[:2]) for layer in layers]}"
            )
        sizes = targets.sizes
        if targets.labels.numel() == 0:
            return [[_empty_match() for _ in range(batch_size)] for _ in layers]

        # All queries of all layers and images against all targets of the batch in one op (float32 even under
        # autocast: the assignment must not flip on rounding); the off-diagonal image blocks are dropped.
        pred_logits = torch.cat([layer["pred_logits"].flatten(0, 1) for layer in layers]).float()
        pred_boxes = torch.cat([layer["pred_boxes"].flatten(0, 1) for layer in layers]).float()
        cost = self.cost_matrix(pred_logits, pred_boxes, targets.labels, targets.boxes.float())
        # The finiteness of all predictions (also the class columns no target gathers) travels with the cost in
        # the one copy to the host: no extra sync.
        finite = torch.isfinite(pred_logits).all() & torch.isfinite(pred_boxes).all()
        host = torch.cat((cost.flatten(), finite.to(cost.dtype)[None])).cpu()
        cost = host[:-1].view(len(layers), batch_size, num_queries, -1)
        if not (host[-1] > 0 and bool(torch.isfinite(cost).all())):
            for layer in layers:
                for name in ("pred_logits", "pred_boxes"):
                    if not bool(torch.isfinite(layer[name]).all()):
                        raise FloatingPointError(f"HungarianMatcher: outputs['{name}'] contains NaN or inf")
            raise FloatingPointError(
                "HungarianMatcher: non-finite matching cost from finite inputs "
                "(a zero-area pred_boxes entry coinciding with a zero-area target box?)"
            )

        all_indices = []
        for layer_cost in cost:
            indices = []
            for i, cost_i in enumerate(layer_cost.split(sizes, dim=-1)):
                if sizes[i] == 0:
                    indices.append(_empty_match())
                    continue
                query_idx, target_idx = linear_sum_assignment(cost_i[i].numpy())
                indices.append(
                    (torch.from_numpy(query_idx).to(torch.int64), torch.from_numpy(target_idx).to(torch.int64))
                )
            all_indices.append(indices)
        return all_indices

    def forward(
        self, outputs: Dict[str, Tensor], targets: Union[TargetBatch, Sequence[Dict[str, Tensor]]]
    ) -> Indices:
        """
        Args:
            outputs: "pred_logits" (B, Q, C) and "pred_boxes" (B, Q, 4) sigmoid-space cxcywh (other keys ignored).
            targets: a `TargetBatch`, or B dicts with "labels" (n_i,) and "boxes" (n_i, 4) normalised cxcywh.
        Returns:
            per image, (query indices, target indices): int64 CPU tensors of length min(Q, n_i).
        """
        pred_logits = outputs["pred_logits"]
        if pred_logits.dim() != 3:
            raise ValueError(f"HungarianMatcher: expected pred_logits (B, Q, C), got {tuple(pred_logits.shape)}")
        batch_size, _, num_classes = pred_logits.shape
        targets = collate_targets(targets, batch_size, num_classes, pred_logits.device)
        return self.match_layers([outputs], targets)[0]
