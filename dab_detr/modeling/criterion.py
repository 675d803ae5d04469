"""DAB-DETR training loss: sigmoid focal classification + L1 + GIoU on Hungarian-matched pairs.

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md)."""

from typing import Dict, List, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import box_convert
from torchvision.ops import sigmoid_focal_loss as _sigmoid_focal_loss

from .box_ops import generalized_box_iou_loss
from .denoising import denoising_losses
from .matcher import HungarianMatcher, Indices
from .targets import TargetBatch, collate_targets


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (Lin et al. 2017) of logits against {0, 1} targets of the same shape, summed / num_boxes.

    `alpha < 0` disables the class-balance weighting (torchvision's `sigmoid_focal_loss`).
    """
    return _sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction="sum") / num_boxes


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
        self, layers: Sequence[Dict[str, Tensor]], indices: List[Indices], targets: TargetBatch, num_boxes: Tensor
    ) -> Dict[str, Tensor]:
        """Weighted losses of L decoder layers given their matchings, computed for all layers at once.

        Args:
            layers: L dicts with "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4).
            indices: per layer, per image (query indices, target indices), as returned by the matcher.
            targets: the batch's targets (T concatenated boxes and labels).
        Returns:
            "loss_class", "loss_bbox", "loss_giou": (L,) weighted losses, one per layer.
        """
        pred_logits = torch.stack([layer["pred_logits"] for layer in layers])  # (L, B, Q, C)
        pred_boxes = torch.stack([layer["pred_boxes"] for layer in layers])  # (L, B, Q, 4)
        num_layers = len(layers)
        # Flat index of the matched pairs of all layers, built on the CPU and moved in one copy: (layer, image,
        # query) into the predictions and the offset target index into the concatenated targets.
        offsets = torch.tensor([0] + targets.sizes[:-1]).cumsum(0).tolist()
        pairs = [(l, b, q, t + offsets[b]) for l, layer in enumerate(indices) for b, (q, t) in enumerate(layer)]
        counts = torch.tensor([len(q) for _, _, q, _ in pairs])
        flat = torch.stack(
            [
                torch.tensor([l for l, _, _, _ in pairs]).repeat_interleave(counts),
                torch.tensor([b for _, b, _, _ in pairs]).repeat_interleave(counts),
                torch.cat([torch.as_tensor(q, dtype=torch.int64) for _, _, q, _ in pairs]),
                torch.cat([torch.as_tensor(t, dtype=torch.int64) for _, _, _, t in pairs]),
            ]
        )
        layer_idx, batch_idx, query_idx, target_idx = flat.to(pred_logits.device).unbind(0)

        # One-hot over the C real classes; unmatched queries keep an all-zero row (no background column).
        onehot = torch.zeros_like(pred_logits)
        onehot[layer_idx, batch_idx, query_idx, targets.labels[target_idx]] = 1
        loss_class = _sigmoid_focal_loss(pred_logits, onehot, self.focal_alpha, self.focal_gamma, reduction="none")
        loss_class = loss_class.flatten(1).sum(1)

        src_boxes = pred_boxes[layer_idx, batch_idx, query_idx]
        tgt_boxes = targets.boxes[target_idx].to(src_boxes.dtype)
        loss_bbox = torch.zeros(num_layers, dtype=src_boxes.dtype, device=src_boxes.device)
        loss_bbox = loss_bbox.index_add(0, layer_idx, (src_boxes - tgt_boxes).abs().sum(-1))
        # 1 - GIoU of the matched pairs only (elementwise, no N x N matrix)
        giou = generalized_box_iou_loss(
            box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        loss_giou = torch.zeros_like(loss_bbox).index_add(0, layer_idx, giou)
        return {
            "loss_class": self.loss_class * loss_class / num_boxes,
            "loss_bbox": self.loss_bbox * loss_bbox / num_boxes,
            "loss_giou": self.loss_giou * loss_giou / num_boxes,
        }

    def forward(self, outputs: Dict, targets: Union[TargetBatch, Sequence[Dict[str, Tensor]]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) of the last layer, optional
                "aux_outputs": list of the same dicts for decoder layers 0 .. L-2; with denoising training also
                "dn_outputs" and "dn_layout" (losses `loss_*_dn`, `loss_*_dn_{i}`: `denoising.denoising_losses`);
                with two-stage DAB-Deformable-DETR "enc_outputs", the encoder's selected proposals (B, Q, ...)
                (losses `loss_*_enc`, matched in the same call as the decoder layers).
            targets: a `TargetBatch` (checked once per step by the meta-architecture), or B dicts with
                "labels" (n_i,) and "boxes" (n_i, 4) normalised cxcywh.
        Returns:
            weighted scalar losses `loss_{class,bbox,giou}` and `loss_{class,bbox,giou}_{i}` per aux layer;
            their sum is the total loss.
        """
        layers = [("", outputs, "outputs")] + [
            (f"_{i}", aux, f"outputs['aux_outputs'][{i}]") for i, aux in enumerate(outputs.get("aux_outputs", []))
        ]
        if "enc_outputs" in outputs:
            layers.append(("_enc", outputs["enc_outputs"], "outputs['enc_outputs']"))
        for _, layer_outputs, name in layers:
            self._check_outputs(layer_outputs, name)
        device = outputs["pred_logits"].device
        batch_size = outputs["pred_logits"].shape[0]
        targets = collate_targets(targets, batch_size, self.num_classes, device)
        num_boxes = self.get_num_boxes(targets.labels.numel(), device)

        layer_outputs = [layer for _, layer, _ in layers]
        indices = self.matcher.match_layers(layer_outputs, targets)
        per_layer = self.layer_losses(layer_outputs, indices, targets, num_boxes)
        by_suffix = {
            suffix: {k + suffix: v[i] for k, v in per_layer.items()} for i, (suffix, _, _) in enumerate(layers)
        }
        encoder = by_suffix.pop("_enc", {})
        losses = {k: v for layer in by_suffix.values() for k, v in layer.items()}
        if "dn_outputs" in outputs:
            losses.update(denoising_losses(
                outputs["dn_outputs"], outputs["dn_layout"], targets, num_boxes, self.loss_class, self.loss_bbox,
                self.loss_giou, self.focal_alpha, self.focal_gamma,
            ))
        losses.update(encoder)  # last, as when the encoder's proposals had a criterion call of their own
        return losses
