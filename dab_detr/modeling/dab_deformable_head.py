"""The DAB-Deformable-DETR detector minus the backbone (arXiv 2201.12329; Deformable DETR, arXiv 2010.04159).

Multi-scale input projections (1x1 conv + GroupNorm(32) per backbone level, then 3x3 stride-2 convs for the
extra levels), sine position encoding per level, the deformable transformer, learnable anchors and content
queries (single-stage) or encoder proposals (two-stage), and one class head per decoder layer.
"""
import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_detector_args, positive_ints
from .dab_detr_head import _init_anchors
from .deformable_transformer import DabDeformableTransformer
from .denoising import DenoisingGenerator, drop_label_embedding, split_denoising_outputs
from .position_encoding import PositionEmbeddingSine
from .targets import TargetBatch


class DabDeformableDetrHead(nn.Module):
    """DAB-Deformable-DETR on backbone feature maps `[(B, C_l, H_l, W_l)]` (strides increasing) and the padding
    mask of the input images `(B, H, W)` (True = padding).

    Returns `{"pred_logits": (B, Q, num_classes), "pred_boxes": (B, Q, 4) sigmoid cxcywh, "aux_outputs": [...]}`
    and, with `two_stage`, `"enc_outputs"` (the selected proposals, for the encoder loss).
    Q = num_queries * max(num_patterns, 1). `in_channels=None` leaves `input_proj` to `build_input_proj`.

    Denoising training (`dn=True`, DN-Deformable-DETR, arXiv 2203.01305): exactly as in `DabDetrHead`. In
    training, when `forward` gets the step's targets, `denoising_groups` noised copies of them run through the
    decoder in front of the matching queries (two-stage: in front of the proposal-initialised queries), hidden
    from them by the self-attention mask; the output also holds "dn_outputs" (G*M queries, every decoder layer)
    and "dn_layout". Matching outputs, and everything in eval mode, are as with `dn=False`. The training-only
    label embedding (`denoising.label_embed`) is dropped, with a log line, when loaded into a `dn=False` model.
    """

    def __init__(
        self,
        in_channels: Optional[Sequence[int]] = None,
        *,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 300,
        nheads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        num_patterns: int = 0,
        random_refpoints_xy: bool = False,
        anchor_init: Optional[str] = None,
        pe_temperature: float = 10000.0,
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
            num_classes=num_classes, hidden_dim=hidden_dim, num_queries=num_queries, nheads=nheads,
            num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward, num_feature_levels=num_feature_levels, enc_n_points=enc_n_points,
            dec_n_points=dec_n_points, dropout=dropout, activation=activation, two_stage=two_stage,
            num_patterns=num_patterns, random_refpoints_xy=random_refpoints_xy, anchor_init=anchor_init,
            prior_prob=prior_prob, dn=dn, denoising_groups=denoising_groups,
        )
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.num_patterns = num_patterns
        self.aux_loss = aux_loss

        self.input_proj = None
        if in_channels is not None:
            self.build_input_proj(in_channels)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, pe_temperature, pe_temperature, offset=-0.5)
        self.transformer = DabDeformableTransformer(
            hidden_dim, nheads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
            num_feature_levels, enc_n_points, dec_n_points, two_stage=two_stage,
            two_stage_num_proposals=num_queries, num_classes=num_classes, inverse_sigmoid_eps=inverse_sigmoid_eps,
        )
        self.class_embed = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_decoder_layers))
        if not two_stage:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
            self.refpoint_embed = nn.Embedding(num_queries, 4)
            with torch.no_grad():
                self.refpoint_embed.weight.copy_(
                    _init_anchors(num_queries, random_refpoints_xy, anchor_init, inverse_sigmoid_eps)
                )
        self.patterns_embed = nn.Embedding(num_patterns, hidden_dim) if num_patterns > 0 else None
        self._reset_head_parameters(prior_prob)
        # Built last, so that every other parameter is initialised the same with dn on and off.
        self.denoising = (
            DenoisingGenerator(num_classes, hidden_dim, denoising_groups, label_noise_prob, box_noise_scale,
                               inverse_sigmoid_eps)
            if dn else None
        )

    def build_input_proj(self, in_channels: Sequence[int]) -> None:
        """1x1 conv + GN per backbone level (`in_channels`, strides increasing), then 3x3 stride-2 conv + GN levels
        (the first reads the last backbone map) up to `num_feature_levels`."""
        in_channels = list(in_channels)
        if not in_channels or any(not isinstance(c, int) or c < 1 for c in in_channels):
            raise ValueError(f"DabDeformableDetrHead: in_channels must be positive ints, got {in_channels!r}")
        if len(in_channels) > self.num_feature_levels:
            raise ValueError(
                f"DabDeformableDetrHead: num_feature_levels={self.num_feature_levels} is fewer than the "
                f"{len(in_channels)} backbone features"
            )
        d = self.hidden_dim
        projs = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in in_channels]
        last = in_channels[-1]
        for _ in range(self.num_feature_levels - len(in_channels)):
            projs.append(nn.Sequential(nn.Conv2d(last, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            last = d
        for proj in projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.input_proj = nn.ModuleList(projs)
        self.num_backbone_levels = len(in_channels)

    @property
    def bbox_embed(self) -> nn.ModuleList:
        """The per-layer box MLPs; the decoder owns them because it refines boxes layer by layer with them."""
        return self.transformer.decoder.bbox_embed

    def _reset_head_parameters(self, prior_prob: float) -> None:
        bias = -math.log((1 - prior_prob) / prior_prob)
        classifiers, box_mlps = list(self.class_embed), list(self.bbox_embed)
        if self.two_stage:
            classifiers.append(self.transformer.enc_class_embed)
            box_mlps.append(self.transformer.enc_bbox_embed)
        for layer in classifiers:
            nn.init.constant_(layer.bias, bias)
        for mlp in box_mlps:  # start every refinement at "keep the reference box"
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        if not self.two_stage:  # Deformable DETR's box-refine init: layer 0 starts by shrinking w, h (-2 logits)
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def queries(self):
        """Content queries `(Q, d)` and anchor logits `(Q, 4)`; with patterns, pattern-major `P * num_queries`
        queries, each the anchor's content plus its pattern embedding."""
        tgt, anchors = self.tgt_embed.weight, self.refpoint_embed.weight
        if self.patterns_embed is not None:
            tgt = tgt.repeat(self.num_patterns, 1) + self.patterns_embed.weight.repeat_interleave(self.num_queries, 0)
            anchors = anchors.repeat(self.num_patterns, 1)
        return tgt, anchors

    def level_features(self, features: Sequence[Tensor], pixel_mask: Tensor):
        """Projected maps `[(B, d, h_l, w_l)]`, padding masks `[(B, h_l, w_l)]` (nearest from `pixel_mask`) and
        position encodings for all `num_feature_levels` levels."""
        if self.input_proj is None:
            raise RuntimeError("DabDeformableDetrHead: in_channels was not given; call build_input_proj first")
        if len(features) != self.num_backbone_levels:
            raise ValueError(
                f"DabDeformableDetrHead: got {len(features)} feature maps, built for {self.num_backbone_levels}"
            )
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        x = features[-1]
        for proj in self.input_proj[len(features):]:
            x = proj(x)
            srcs.append(x)
        mask = pixel_mask[None].float()
        masks = [F.interpolate(mask, size=s.shape[-2:])[0].bool() for s in srcs]
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        return srcs, masks, pos

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.denoising is None:
            drop_label_embedding(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, features: Sequence[Tensor], pixel_mask: Tensor, targets: Optional[TargetBatch] = None
    ) -> Dict[str, object]:
        """`features [(B, C_l, H_l, W_l)]`, `pixel_mask (B, H, W)` bool (True = padding) -> raw outputs.

        `targets` (training only) are read by denoising training and ignored otherwise.
        """
        srcs, masks, pos = self.level_features(features, pixel_mask)
        if self.two_stage:
            tgt = anchors = None  # K = min(num_queries, tokens) proposals, chosen by the encoder
            num_matching = min(self.num_queries, sum(s.shape[-2] * s.shape[-1] for s in srcs))
        else:
            tgt, anchors = self.queries()
            num_matching = tgt.shape[0]
        dn = None
        if self.denoising is not None and self.training and targets is not None:
            dn = self.denoising(targets, num_matching)
            out = self.transformer(srcs, masks, pos, tgt, anchors, dn.attn_mask, dn.content, dn.anchors)
        else:
            out = self.transformer(srcs, masks, pos, tgt, anchors)
        out = self.predictions(out)
        if dn is not None:
            enc = out.pop("enc_outputs", None)
            dn_outputs, out = split_denoising_outputs(out, dn.layout.num_queries)
            out.update(dn_outputs=dn_outputs, dn_layout=dn.layout)
            if enc is not None:
                out["enc_outputs"] = enc
        return out

    def predictions(self, transformer_out: Dict[str, Tensor]) -> Dict[str, object]:
        """Class logits per decoder layer, packed with the boxes into the criterion's dict layout."""
        hs, boxes = transformer_out["hs"], transformer_out["boxes"]
        first = 0 if self.aux_loss else len(self.class_embed) - 1
        logits = [self.class_embed[i](hs[i]) for i in range(first, len(self.class_embed))]
        out: Dict[str, object] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        if "enc_logits" in transformer_out:
            out["enc_outputs"] = {
                "pred_logits": transformer_out["enc_logits"], "pred_boxes": transformer_out["enc_boxes"]
            }
        return out


def _check_args(**a) -> None:
    name = "DabDeformableDetrHead"
    positive_ints(name, **{n: a[n] for n in (
        "num_classes", "hidden_dim", "num_queries", "nheads", "num_encoder_layers", "num_decoder_layers",
        "dim_feedforward", "num_feature_levels", "enc_n_points", "dec_n_points")})
    if a["hidden_dim"] % 32:  # GroupNorm(32) in the input projections; also a multiple of 4 for the sine PE
        raise ValueError(f"{name}: hidden_dim must be a multiple of 32 (GroupNorm(32)), got {a['hidden_dim']}")
    check_detector_args(name, a)
    if a["dn"]:
        positive_ints(name, denoising_groups=a["denoising_groups"])
    if a["two_stage"]:
        for n in ("num_patterns", "random_refpoints_xy", "anchor_init"):
            if a[n]:
                raise ValueError(f"{name}: {n} has no effect with two_stage (anchors come from the encoder); unset it")
