"""Ground truth of one batch, validated and concatenated once per training step.

The matcher and the criterion read the same `TargetBatch` for every decoder layer, so the checks run once per step,
not once per layer.
"""
from typing import Dict, List, NamedTuple, Sequence, Union

import torch
from torch import Tensor


class TargetBatch(NamedTuple):
    """Targets of all images of a batch, concatenated.

    labels (T,) int64 in [0, C); boxes (T, 4) normalised cxcywh with w, h >= 0; sizes: [n_0, ..., n_{B-1}], T = sum.
    """

    labels: Tensor
    boxes: Tensor
    sizes: List[int]

    def per_image(self) -> List[Dict[str, Tensor]]:
        """The per-image view: B dicts with "labels" (n_i,) and "boxes" (n_i, 4) (views, no copy)."""
        return [
            {"labels": labels, "boxes": boxes}
            for labels, boxes in zip(self.labels.split(self.sizes), self.boxes.split(self.sizes))
        ]


def check_target_batch(labels: Tensor, boxes: Tensor, sizes: Sequence[int], num_classes: int) -> TargetBatch:
    """Validate concatenated targets and wrap them; `labels` is cast to int64. Targets on a device cost one host
    sync here (the meta-architecture checks them on the host, before moving them)."""
    labels = labels.to(torch.int64)
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
    return TargetBatch(labels, boxes, list(sizes))


def collate_targets(
    targets: Union[TargetBatch, Sequence[Dict[str, Tensor]]], batch_size: int, num_classes: int, device: torch.device
) -> TargetBatch:
    """A `TargetBatch` as is, or per-image dicts ("labels" int (n_i,), "boxes" normalised cxcywh (n_i, 4))
    checked and concatenated onto `device`."""
    if isinstance(targets, TargetBatch):
        if len(targets.sizes) != batch_size:
            raise ValueError(f"targets: expected {batch_size} images, got a TargetBatch of {len(targets.sizes)}")
        return targets
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
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)
    return check_target_batch(labels, boxes, [len(t["labels"]) for t in targets], num_classes)
