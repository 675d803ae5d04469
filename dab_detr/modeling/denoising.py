"""Denoising training (DN-DETR, Li et al., CVPR 2022, arXiv 2203.01305) for decoders whose queries are anchor boxes.

In training, noised copies of the ground truth enter the decoder as extra queries, and each must reconstruct the
box and class it was made from: no Hungarian matching for them, so they give a stable training signal (Sec. 3).
Nothing changes at inference. The pieces here are model-agnostic: they need the step's `TargetBatch`, the number
of matching queries and a decoder that takes extra (content, anchor) queries and a self-attention mask.

Query layout in training (Sec. 3.4, Fig. 4): `[group 0 | ... | group G-1 | matching queries]`. Each group has
`M` slots, M = the largest target count in the batch; image b's `n_b` targets fill the first n_b slots of every
group (the same target order in each group), its remaining slots are padding (zero content, centre anchor).
"""
import logging
from typing import Dict, List, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from .box_ops import generalized_box_iou_loss, inverse_sigmoid
from .targets import TargetBatch

logger = logging.getLogger(__name__)

LABEL_EMBED_KEY = "denoising.label_embed.weight"  # a head's `denoising` = DenoisingGenerator, training-only


def drop_label_embedding(state_dict: Dict[str, Tensor], prefix: str) -> None:
    """For a head built with `dn=False`: remove a denoising-trained checkpoint's label embedding (used only in
    training) from `state_dict` before it loads, with a log line, so that the load stays strict."""
    key = prefix + LABEL_EMBED_KEY
    if key in state_dict:
        state_dict.pop(key)
        logger.info(f"Dropped {key}: the denoising label embedding is only used in training with dn=True")


class DenoisingLayout(NamedTuple):
    """Where the G*T real denoising queries sit (T = targets in the batch), group-major.

    `batch_idx`, `query_idx (G*T,)`: image and slot (in `[0, G*M)`) of each one; `target_idx (G*T,)`: the target
    it was made from, as an index into the batch's concatenated targets.
    """

    groups: int
    max_targets: int  # M
    batch_idx: Tensor
    query_idx: Tensor
    target_idx: Tensor

    @property
    def num_queries(self) -> int:
        """G * M: the denoising part of the decoder's queries (padding included)."""
        return self.groups * self.max_targets


class DenoisingQueries(NamedTuple):
    """Extra decoder queries: `content (B, G*M, d)`, `anchors (B, G*M, 4)` (cxcywh logits), the decoder
    self-attention mask `attn_mask (B, 1, G*M+Q, G*M+Q)` (True = may attend) and their `layout`."""

    content: Tensor
    anchors: Tensor
    attn_mask: Tensor
    layout: DenoisingLayout


def denoising_layout(sizes: Sequence[int], groups: int) -> DenoisingLayout:
    """Index tensors (on the CPU) of the real denoising queries of a batch with `sizes[b]` targets in image b."""
    sizes_t = torch.tensor(list(sizes), dtype=torch.int64)
    max_targets = int(sizes_t.max()) if len(sizes) else 0
    total = int(sizes_t.sum())
    image = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)  # (T,)
    first = torch.cumsum(sizes_t, 0) - sizes_t  # index of each image's first target
    rank = torch.arange(total) - first[image]  # position of each target within its image
    slots = torch.arange(groups)[:, None] * max_targets + rank  # (G, T)
    return DenoisingLayout(
        groups, max_targets, image.repeat(groups), slots.flatten(), torch.arange(total).repeat(groups)
    )


def denoising_attn_mask(sizes: Sequence[int], groups: int, num_matching: int) -> Tensor:
    """Decoder self-attention mask `(B, 1, G*M+Q, G*M+Q)` bool, True = may attend (SDPA's convention), Q matching.

    - matching queries see the matching queries only: they cannot read the ground truth hidden in the others;
    - a denoising query sees the real (non-padding) queries of its own group and the matching queries: no group
      sees another (each group is an independent reconstruction task), and padding slots are invisible, so an
      image's denoising outputs do not depend on how many targets the other images of the batch have.
    The references (DN-DETR, detrex) leave padding slots visible inside their group; that is the only difference.
    """
    sizes_t = torch.tensor(list(sizes), dtype=torch.int64)
    max_targets = int(sizes_t.max()) if len(sizes) else 0
    num_dn = groups * max_targets
    slot = torch.arange(num_dn)
    group, rank = slot // max(max_targets, 1), slot % max(max_targets, 1)
    real = rank[None, :] < sizes_t[:, None]  # (B, G*M): key slot holds a target of that image
    same_group = group[:, None] == group[None, :]  # (G*M, G*M)
    size = num_dn + num_matching
    mask = torch.zeros(len(sizes), size, size, dtype=torch.bool)
    mask[:, :, num_dn:] = True
    mask[:, :num_dn, :num_dn] = same_group[None] & real[:, None, :]
    return mask[:, None]


def apply_label_noise(labels: Tensor, noise_prob: float, num_classes: int) -> Tensor:
    """Each label replaced, with probability `noise_prob`, by a class drawn uniformly from [0, num_classes)
    (possibly itself). Draws from torch's global generator of `labels.device`; a fixed number of draws per label."""
    flip = torch.rand(labels.shape, device=labels.device) < noise_prob
    random_labels = torch.randint(0, num_classes, labels.shape, device=labels.device)
    return torch.where(flip, random_labels, labels)


def apply_box_noise(boxes: Tensor, noise_scale: float) -> Tensor:
    """Noised normalised cxcywh boxes `(N, 4)`: the centre moves by up to `noise_scale * (w/2, h/2)`, w and h are
    scaled by a factor in `[1 - noise_scale, 1 + noise_scale]` (uniform), then all four are clipped to [0, 1]
    (DN-DETR Sec. 3.2). Draws from torch's global generator of `boxes.device`."""
    wh = boxes[:, 2:]
    span = torch.cat((wh / 2, wh), dim=1) * noise_scale
    return (boxes + (torch.rand_like(boxes) * 2 - 1) * span).clamp(0.0, 1.0)


class DenoisingGenerator(nn.Module):
    """Builds the denoising queries of a training batch (DN-DETR Sec. 3).

    Content query = `[label_embed(noised label), 1]`: a learned embedding of size hidden_dim - 1 plus the indicator
    bit (1 = denoising query; padding slots are all zero). Anchor = the noised box, in inverse-sigmoid space as the
    model's anchors are. The label embedding is training-only: inference never reads it.

    Args:
        num_classes: C; noised labels are drawn from [0, C).
        hidden_dim: d, the decoder width.
        denoising_groups: G copies of each image's targets (5).
        label_noise_prob: probability that a label is replaced by a random class (0.2).
        box_noise_scale: box noise scale (0.4); 0 disables box noise.
        inverse_sigmoid_eps: eps of the anchors' inverse sigmoid (the model's).
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        denoising_groups: int = 5,
        label_noise_prob: float = 0.2,
        box_noise_scale: float = 0.4,
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        if not isinstance(denoising_groups, int) or denoising_groups < 1:
            raise ValueError(f"denoising_groups must be a positive int, got {denoising_groups!r}")
        if not 0.0 <= label_noise_prob <= 1.0:
            raise ValueError(f"label_noise_prob must be in [0, 1], got {label_noise_prob}")
        if box_noise_scale < 0:
            raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
        self.num_classes = num_classes
        self.denoising_groups = denoising_groups
        self.label_noise_prob = label_noise_prob
        self.box_noise_scale = box_noise_scale
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.label_embed = nn.Embedding(num_classes, hidden_dim - 1)

    def forward(self, targets: TargetBatch, num_matching: int) -> DenoisingQueries:
        """`targets`: the batch's checked targets (labels (T,), normalised cxcywh boxes (T, 4), `sizes[b]` of them in
        image b); `num_matching` = Q, the matching queries that follow the denoising ones.

        A batch without targets gives G*M = 0 denoising queries (the label embedding still joins the graph, with a
        zero gradient, so that every parameter receives a gradient in every step, as DDP requires).
        """
        labels, boxes, sizes = targets
        groups, device = self.denoising_groups, boxes.device
        layout = denoising_layout(sizes, groups)
        index = torch.stack((layout.batch_idx, layout.query_idx)).to(device, non_blocking=True)
        noised_labels = apply_label_noise(labels.repeat(groups), self.label_noise_prob, self.num_classes)
        noised_boxes = boxes.repeat(groups, 1)
        if self.box_noise_scale > 0:
            noised_boxes = apply_box_noise(noised_boxes, self.box_noise_scale)

        label_embed = self.label_embed(noised_labels)
        content = torch.cat((label_embed, label_embed.new_ones(label_embed.shape[0], 1)), dim=1)
        anchors = inverse_sigmoid(noised_boxes, self.inverse_sigmoid_eps).to(content.dtype)
        batch, num_dn = len(sizes), layout.num_queries
        content = content.new_zeros(batch, num_dn, content.shape[1]).index_put((index[0], index[1]), content)
        anchors = anchors.new_zeros(batch, num_dn, 4).index_put((index[0], index[1]), anchors)
        attn_mask = denoising_attn_mask(sizes, groups, num_matching).to(device, non_blocking=True)
        return DenoisingQueries(content, anchors, attn_mask, layout._replace(
            batch_idx=index[0], query_idx=index[1], target_idx=layout.target_idx.to(device, non_blocking=True)
        ))

    def extra_repr(self) -> str:
        return (f"groups={self.denoising_groups}, label_noise_prob={self.label_noise_prob}, "
                f"box_noise_scale={self.box_noise_scale}")


def denoising_losses(
    dn_outputs: Dict,
    layout: DenoisingLayout,
    targets: TargetBatch,
    num_boxes: Tensor,
    loss_class: float = 1.0,
    loss_bbox: float = 5.0,
    loss_giou: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> Dict[str, Tensor]:
    """Weighted focal + L1 + GIoU losses of every real denoising query against the target it was made from.

    Args:
        dn_outputs: "pred_logits" (B, G*M, C), "pred_boxes" (B, G*M, 4) of the last decoder layer and optional
            "aux_outputs" (same dicts, decoder layers 0 .. L-2).
        layout: from `DenoisingGenerator`; targets: the step's `TargetBatch` (T targets).
        num_boxes: the matching losses' normaliser (targets per worker, >= 1).
    Returns:
        `loss_{class,bbox,giou}_dn` and `loss_{class,bbox,giou}_dn_{i}` per auxiliary layer.

    Normalisation as DN-DETR: each loss is summed over the G*T denoising queries (focal: and over the C classes)
    and divided by G * num_boxes; padding slots get no loss. The weights are the matching losses' (1, 5, 2).
    """
    normaliser = num_boxes * layout.groups
    target_boxes = targets.boxes[layout.target_idx]  # (G*T, 4) cxcywh
    target_xyxy = box_convert(target_boxes, "cxcywh", "xyxy")
    # scattered, not F.one_hot: that one checks the labels' range, a host sync (they were checked once this step)
    onehot = dn_outputs["pred_logits"].new_zeros(len(layout.target_idx), dn_outputs["pred_logits"].shape[-1])
    onehot.scatter_(1, targets.labels[layout.target_idx][:, None], 1)
    layers = [("", dn_outputs)] + [(f"_{i}", aux) for i, aux in enumerate(dn_outputs.get("aux_outputs", []))]
    losses: Dict[str, Tensor] = {}
    for suffix, out in layers:
        logits = out["pred_logits"][layout.batch_idx, layout.query_idx]  # (G*T, C)
        pred_boxes = out["pred_boxes"][layout.batch_idx, layout.query_idx]  # (G*T, 4)
        focal = sigmoid_focal_loss(logits, onehot.to(logits.dtype), focal_alpha, focal_gamma, reduction="sum")
        l1 = (pred_boxes - target_boxes.to(pred_boxes.dtype)).abs().sum()
        giou = generalized_box_iou_loss(box_convert(pred_boxes, "cxcywh", "xyxy"), target_xyxy).sum()  # 1 - GIoU
        losses["loss_class_dn" + suffix] = loss_class * focal / normaliser
        losses["loss_bbox_dn" + suffix] = loss_bbox * l1 / normaliser
        losses["loss_giou_dn" + suffix] = loss_giou * giou / normaliser
    return losses


def split_denoising_outputs(outputs: Dict, num_denoising: int) -> List[Dict]:
    """Split raw head outputs whose queries are `[denoising | matching]` into (denoising, matching) dicts of the same
    shape ("pred_logits", "pred_boxes", optional "aux_outputs")."""
    def split(layer: Dict[str, Tensor], part: slice) -> Dict[str, Tensor]:
        return {"pred_logits": layer["pred_logits"][:, part], "pred_boxes": layer["pred_boxes"][:, part]}

    parts = []
    for part in (slice(None, num_denoising), slice(num_denoising, None)):
        out: Dict = split(outputs, part)
        if "aux_outputs" in outputs:
            out["aux_outputs"] = [split(aux, part) for aux in outputs["aux_outputs"]]
        parts.append(out)
    return parts
