"""DAB-DETR training loss: sigmoid focal classification + L1 + GIoU on Hungarian-matched pairs.

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md)."""

from itertools import accumulate
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher, concat_targets


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (Lin et al. 2017) of logits against {0, 1} targets of the same shape, summed / num_boxes.

    `alpha < 0` disables the class-balance weighting.
    """
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    """Weighted DAB-DETR losses for the last decoder layer and every auxiliary layer.

    Each layer is matched separately; all layers share one `num_boxes` normaliser.

    Args:
        num_classes: C, the width of `pred_logits` (no background class).
        matcher: the `HungarianMatcher`.
        loss_class, loss_bbox, loss_giou: weights of the focal, L1 and GIoU losses (1, 5, 2).
        focal_alpha, focal_gamma: focal-loss parameters (0.25, 2).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        loss_class: float = 1.0,
        loss_bbox: float = 5.0,
        loss_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.loss_class = loss_class
        self.loss_bbox = loss_bbox
        self.loss_giou = loss_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def get_num_boxes(self, num_targets: int, device: torch.device) -> Tensor:
        """Mean number of targets per worker (all-reduced when torch.distributed is initialised), >= 1.

        Returns a 0-d tensor so that no host sync is needed on an accelerator.
        """
        num_boxes = torch.tensor(float(num_targets), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        return num_boxes.clamp(min=1)

    def _check_outputs(self, outputs: Dict[str, Tensor], name: str) -> None:
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if pred_logits.dim() != 3 or pred_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"{name}['pred_logits'] must be (B, Q, num_classes={self.num_classes}), got {tuple(pred_logits.shape)}"
            )
        if pred_boxes.shape != (*pred_logits.shape[:2], 4):
            raise ValueError(
                f"{name}['pred_boxes'] must be (B, Q, 4) = {(*pred_logits.shape[:2], 4)}, got {tuple(pred_boxes.shape)}"
            )

    def layer_losses(
        self,
        outputs: Dict[str, Tensor],
        indices: List[Tuple[Tensor, Tensor]],
        tgt_labels: Tensor,
        tgt_boxes: Tensor,
        sizes: List[int],
        num_boxes: Tensor,
    ) -> Dict[str, Tensor]:
        """Weighted losses of one decoder layer given its matching.

        Args:
            outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4).
            indices: per image (query indices, target indices), as returned by the matcher.
            tgt_labels (T,), tgt_boxes (T, 4): targets of all images concatenated; `sizes` per image.
        """
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        # Flat index of the matched pairs, built on the CPU and moved in one copy: (image, query) into the
        # predictions and the offset target index into the concatenated targets.
        offsets = list(accumulate([0] + sizes[:-1]))
        flat = torch.stack(
            [
                torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]),
                torch.cat([q for q, _ in indices]),
                torch.cat([t + offsets[i] for i, (_, t) in enumerate(indices)]),
            ]
        )
        batch_idx, query_idx, target_idx = flat.to(pred_logits.device).unbind(0)

        # One-hot over the C real classes; unmatched queries keep an all-zero row (no background column).
        onehot = torch.zeros_like(pred_logits)
        onehot[batch_idx, query_idx, tgt_labels[target_idx]] = 1
        loss_class = sigmoid_focal_loss(pred_logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)

        src_boxes = pred_boxes[batch_idx, query_idx]
        matched_tgt_boxes = tgt_boxes[target_idx].to(src_boxes.dtype)
        loss_bbox = F.l1_loss(src_boxes, matched_tgt_boxes, reduction="none").sum() / num_boxes
        # diag of the pairwise GIoU: matched pairs per batch are few (~100), so the N x N matrix is cheap.
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(matched_tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {
            "loss_class": self.loss_class * loss_class,
            "loss_bbox": self.loss_bbox * loss_bbox,
            "loss_giou": self.loss_giou * loss_giou,
        }

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) of the last layer, optional
                "aux_outputs": list of the same dicts for decoder layers 0 .. L-2.
            targets: B dicts with "labels" (n_i,) and "boxes" (n_i, 4) normalised cxcywh.
        Returns:
            weighted scalar losses `loss_{class,bbox,giou}` and `loss_{class,bbox,giou}_{i}` per aux layer;
            their sum is the total loss.
        """
        layers = [("", outputs, "outputs")] + [
            (f"_{i}", aux, f"outputs['aux_outputs'][{i}]") for i, aux in enumerate(outputs.get("aux_outputs", []))
        ]
        for _, layer_outputs, name in layers:
            self._check_outputs(layer_outputs, name)
        device = outputs["pred_logits"].device
        batch_size = outputs["pred_logits"].shape[0]
        tgt_labels, tgt_boxes, sizes = concat_targets(targets, batch_size, self.num_classes, device)
        num_boxes = self.get_num_boxes(tgt_labels.numel(), device)

        losses = {}
        for suffix, layer_outputs, _ in layers:
            indices = self.matcher(layer_outputs, targets)
            layer = self.layer_losses(layer_outputs, indices, tgt_labels, tgt_boxes, sizes, num_boxes)
            losses.update({k + suffix: v for k, v in layer.items()})
        return losses
