"""The DAB-DETR detector minus the backbone: input projection, position embedding, transformer, anchors, heads.

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md)."""
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .box_ops import inverse_sigmoid
from .denoising import DenoisingGenerator, drop_label_embedding, split_denoising_outputs
from .position_encoding import PositionEmbeddingSine
from .targets import TargetBatch
from .checks import check_detector_args, positive_ints
from .conv import Conv2d
from .transformer import QUERY_SCALE_TYPES, DabDetrTransformer


class DabDetrHead(nn.Module):
    """DAB-DETR on a backbone feature map `(B, C, H, W)` with its padding mask `(B, H, W)` (True = padding).

    Returns `{"pred_logits": (B, Q, num_classes), "pred_boxes": (B, Q, 4) sigmoid cxcywh, "aux_outputs": [...]}`
    for the last decoder layer and (with `aux_loss`) the L-1 earlier ones; Q = num_queries * max(num_patterns, 1).

    Anchor options: `random_refpoints_xy` draws x, y ~ U(0, 1) (the official "fixxy" init); `freeze_anchor_xy`
    keeps x, y out of training for real (they live in the buffer `anchor_xy`, w, h in the parameter `anchor_wh`);
    `anchor_init="spread"` draws x, y ~ U(0.05, 0.95), w, h ~ U(0.1, 0.4) — needed when training from scratch,
    where the default N(0, 1) logits put every anchor near the image centre.
    `in_channels=None` leaves `input_proj` to be built by `build_input_proj` once the backbone is known.

    Denoising training (`dn=True`, DN-DETR): in training, when `forward` is given the step's targets,
    `denoising_groups` noised copies of them run through the decoder in front of the matching queries (see
    `denoising.py`); the output then also holds "dn_outputs" (same layout as the matching outputs, over the G*M
    denoising queries) and "dn_layout". The matching outputs, and everything in eval mode, are computed exactly as
    with `dn=False`. The label embedding (`denoising.label_embed`) is training-only: a model with `dn=False` drops
    it from a checkpoint with a log line, a model with `dn=True` starts it fresh when a checkpoint lacks it.
    Patterns (`num_patterns` > 0) are supported: the denoising queries come first, then all P*Nq matching ones.
    """

    def __init__(
        self,
        in_channels: Optional[int] = None,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 300,
        nheads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "prelu",
        num_patterns: int = 0,
        query_scale_type: str = "cond_elewise",
        modulate_hw_attn: bool = True,
        keep_query_pos: bool = False,
        rm_self_attn_decoder: bool = False,
        bbox_embed_diff_each_layer: bool = False,
        random_refpoints_xy: bool = False,
        freeze_anchor_xy: bool = False,
        anchor_init: Optional[str] = None,
        pe_temperature_h: float = 20.0,
        pe_temperature_w: float = 20.0,
        prior_prob: float = 0.01,
        inverse_sigmoid_eps: float = 1e-3,
        aux_loss: bool = True,
        dn: bool = False,
        denoising_groups: int = 5,
        label_noise_prob: float = 0.2,
        box_noise_scale: float = 0.4,
    ):
        super().__init__()
        _check_args(
            in_channels=in_channels, num_classes=num_classes, hidden_dim=hidden_dim, num_queries=num_queries,
            nheads=nheads, num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward, dropout=dropout, activation=activation, num_patterns=num_patterns,
            query_scale_type=query_scale_type, anchor_init=anchor_init, random_refpoints_xy=random_refpoints_xy,
            prior_prob=prior_prob, inverse_sigmoid_eps=inverse_sigmoid_eps,
        )
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.freeze_anchor_xy = freeze_anchor_xy
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.aux_loss = aux_loss

        self.input_proj = None
        if in_channels is not None:
            self.build_input_proj(in_channels)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, pe_temperature_h, pe_temperature_w)
        self.transformer = DabDetrTransformer(
            hidden_dim, nheads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
            num_patterns=num_patterns, query_scale_type=query_scale_type, modulate_hw_attn=modulate_hw_attn,
            keep_query_pos=keep_query_pos, rm_self_attn_decoder=rm_self_attn_decoder,
            bbox_embed_diff_each_layer=bbox_embed_diff_each_layer, inverse_sigmoid_eps=inverse_sigmoid_eps,
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes)

        anchors = _init_anchors(num_queries, random_refpoints_xy, anchor_init, inverse_sigmoid_eps)
        if freeze_anchor_xy:
            self.register_buffer("anchor_xy", anchors[:, :2].clone())
            self.anchor_wh = nn.Parameter(anchors[:, 2:].clone())
        else:
            self.anchor_box_embed = nn.Embedding(num_queries, 4)
            with torch.no_grad():
                self.anchor_box_embed.weight.copy_(anchors)
        self._reset_head_parameters(prior_prob)
        # Built last, so that every other parameter is initialised the same with dn on and off.
        self.denoising = (
            DenoisingGenerator(num_classes, hidden_dim, denoising_groups, label_noise_prob, box_noise_scale,
                               inverse_sigmoid_eps)
            if dn else None
        )

    def build_input_proj(self, in_channels: int) -> None:
        """The 1x1 conv from the backbone feature (`in_channels`) to `hidden_dim`."""
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"DabDetrHead: in_channels must be a positive int, got {in_channels!r}")
        self.input_proj = Conv2d(in_channels, self.hidden_dim, kernel_size=1)  # a GEMM on NHWC features

    @property
    def bbox_embed(self) -> nn.Module:
        """The box MLP (d -> d -> 4); the decoder owns it because it refines boxes layer by layer with it."""
        return self.transformer.decoder.bbox_embed

    def _reset_head_parameters(self, prior_prob: float) -> None:
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        box_mlps = self.bbox_embed if isinstance(self.bbox_embed, nn.ModuleList) else [self.bbox_embed]
        for mlp in box_mlps:  # start every layer's refinement at "keep the reference box"
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)

    def anchor_boxes(self) -> Tensor:
        """The learned anchors `(num_queries, 4)`, cxcywh logits (before the sigmoid)."""
        if self.freeze_anchor_xy:
            return torch.cat((self.anchor_xy, self.anchor_wh), dim=1)
        return self.anchor_box_embed.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints store anchors as `anchor_box_embed.weight` (official, HF, non-frozen runs) or split as
        # `anchor_xy` + `anchor_wh` (frozen-xy runs): accept either layout in either mode.
        full, xy, wh = prefix + "anchor_box_embed.weight", prefix + "anchor_xy", prefix + "anchor_wh"
        if self.freeze_anchor_xy and full in state_dict:
            weight = state_dict.pop(full)
            state_dict[xy], state_dict[wh] = weight[:, :2], weight[:, 2:]
        elif not self.freeze_anchor_xy and xy in state_dict and wh in state_dict:
            state_dict[full] = torch.cat((state_dict.pop(xy), state_dict.pop(wh)), dim=1)
        if self.denoising is None:
            drop_label_embedding(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: Tensor, mask: Tensor, targets: Optional[TargetBatch] = None) -> Dict[str, object]:
        """`features (B, C, H, W)`, `mask (B, H, W)` bool (True = padding) -> raw outputs (see class doc).

        `targets` (training only) are read by denoising training and ignored otherwise.
        """
        if self.input_proj is None:
            raise RuntimeError("DabDetrHead: in_channels was not given; call build_input_proj(in_channels) first")
        if mask.shape != (features.shape[0],) + features.shape[-2:]:
            raise ValueError(
                f"DabDetrHead: mask shape {tuple(mask.shape)} does not match features {tuple(features.shape)}"
            )
        src = self.input_proj(features)
        pos = self.position_embedding(mask).to(src.dtype)
        anchors = self.anchor_boxes()
        dn = None
        if self.denoising is not None and self.training and targets is not None:
            dn = self.denoising(targets, self.transformer.num_patterns_or_one * anchors.shape[0])
            hs, references = self.transformer(src, mask, pos, anchors, dn.content, dn.anchors, dn.attn_mask)
        else:
            hs, references = self.transformer(src, mask, pos, anchors)
        if not self.aux_loss:  # only the last layer is needed
            hs, references = hs[-1:], references[-1:]
            first_layer = len(self.transformer.decoder.layers) - 1
        else:
            first_layer = 0

        logits = self.class_embed(hs)
        if isinstance(self.bbox_embed, nn.ModuleList):
            deltas = torch.stack([self.bbox_embed[first_layer + i](h) for i, h in enumerate(hs)])
        else:
            deltas = self.bbox_embed(hs)
        boxes = (deltas + inverse_sigmoid(references, self.inverse_sigmoid_eps)).sigmoid()

        out: Dict[str, object] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])
            ]
        if dn is not None:
            dn_outputs, out = split_denoising_outputs(out, dn.layout.num_queries)
            out.update(dn_outputs=dn_outputs, dn_layout=dn.layout)
        return out


def _init_anchors(num_queries: int, random_refpoints_xy: bool, anchor_init: Optional[str], eps: float) -> Tensor:
    """Initial anchors `(num_queries, 4)` as logits: N(0, 1) as nn.Embedding (official), then the options."""
    anchors = torch.randn(num_queries, 4)
    if random_refpoints_xy:
        anchors[:, :2] = inverse_sigmoid(torch.rand(num_queries, 2), eps)
    if anchor_init == "spread":
        anchors[:, :2] = inverse_sigmoid(torch.empty(num_queries, 2).uniform_(0.05, 0.95), eps)
        anchors[:, 2:] = inverse_sigmoid(torch.empty(num_queries, 2).uniform_(0.1, 0.4), eps)
    return anchors


def _check_args(**a) -> None:
    name = "DabDetrHead"
    sizes = ("num_classes", "hidden_dim", "num_queries", "nheads", "num_encoder_layers", "num_decoder_layers",
             "dim_feedforward") + (() if a["in_channels"] is None else ("in_channels",))
    positive_ints(name, **{n: a[n] for n in sizes})
    check_detector_args(name, a)
    if a["hidden_dim"] % 4:  # hidden_dim / 2 sine features per axis, in sin/cos pairs
        raise ValueError(f"{name}: hidden_dim must be a multiple of 4, got {a['hidden_dim']}")
    if a["query_scale_type"] not in QUERY_SCALE_TYPES:
        raise ValueError(f"{name}: query_scale_type must be one of {QUERY_SCALE_TYPES}, got {a['query_scale_type']!r}")
    if not 0.0 < a["inverse_sigmoid_eps"] < 0.5:
        raise ValueError(f"{name}: inverse_sigmoid_eps must be in (0, 0.5), got {a['inverse_sigmoid_eps']}")
