"""DAB-Deformable-DETR transformer (arXiv 2201.12329, Sec. 4 / App.; on Deformable DETR, arXiv 2010.04159).

Encoder: deformable self-attention over all levels' tokens (each token's reference point is its own cell centre).
Decoder: anchor boxes as queries; per layer `query_pos = query_scale(content) * ref_point_head(PE(anchor))`
(scale 1 in layer 0), self-attention with q = k = content + query_pos, deformable cross-attention that samples
inside the anchor (4-D reference), FFN, then box refinement `anchor' = sigmoid(bbox_embed(out) + logit(anchor))`,
detached before the next layer. Two-stage: the top-k encoder proposals become the (detached) anchors and contents.

Layout is batch-first: tokens `(B, S, d)`, S = sum over levels of h * w. Module names follow the official code
(`self_attn`, `cross_attn`, `norm1..3`, `linear1/2`, `level_embed`, `query_scale`, `ref_point_head`,
`enc_output(_norm)`), so its checkpoints map by a short rename table.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention
from .box_ops import inverse_sigmoid
from .mlp import MLP
from .ms_deform_attn import MSDeformAttn
from .position_encoding import anchor_sine_embed
from .transformer import build_activation


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, training) if p > 0 and training else x


def valid_ratios(masks: Sequence[Tensor]) -> Tensor:
    """Fraction of each level's map covered by the image: padding masks `[(B, h, w)]` -> `(B, L, 2)` as (w, h)."""
    ratios = []
    for mask in masks:
        valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32) / mask.shape[1]
        valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32) / mask.shape[2]
        ratios.append(torch.stack((valid_w, valid_h), -1))
    return torch.stack(ratios, 1)


def encoder_reference_points(spatial_shapes: Sequence[Tuple[int, int]], ratios: Tensor) -> Tensor:
    """Each token's cell centre, normalised by its image's valid area, seen on every level: `(B, S, L, 2)` (x, y)."""
    refs = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys = (torch.arange(h, dtype=torch.float32, device=ratios.device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=ratios.device) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, h * w, 2)  # (1, hw, 2) as (x, y)
        refs.append(grid / ratios[:, None, level])  # in units of this image's valid area
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention (query = src + pos), then FFN."""

    def __init__(self, d_model: int, nhead: int, n_levels: int, n_points: int, dim_feedforward: int,
                 dropout: float, activation: str):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, nhead, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = build_activation(activation)
        self.dropout = dropout

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes, padding_mask: Tensor):
        """`src`, `pos (B, S, d)`, `reference_points (B, S, L, 2)`, `padding_mask (B, S)` -> `(B, S, d)`."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + _dropout(src2, self.dropout, self.training))
        ffn = self.linear2(_dropout(self.activation(self.linear1(src)), self.dropout, self.training))
        return self.norm2(src + _dropout(ffn, self.dropout, self.training))


class DeformableEncoder(nn.Module):
    """`num_layers` deformable encoder layers; every token's reference point is its own cell centre."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, n_levels: int, n_points: int,
                 dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, nhead, n_levels, n_points, dim_feedforward, dropout, activation)
            for _ in range(num_layers)
        )

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes, padding_mask: Tensor):
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DabDeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention (q = k = tgt + query_pos) -> norm2, deformable cross-attention from
    tgt + query_pos around the anchor -> norm1, FFN -> norm3 (the official norm numbering)."""

    def __init__(self, d_model: int, nhead: int, n_levels: int, n_points: int, dim_feedforward: int,
                 dropout: float, activation: str):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, nhead, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = build_activation(activation)
        self.dropout = dropout

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes,
                memory_padding_mask: Tensor, self_attn_mask: Optional[Tensor] = None) -> Tensor:
        """`tgt`, `query_pos (B, Q, d)`, `reference_points (B, Q, L, 4)`, `memory (B, S, d)` -> `(B, Q, d)`.

        `self_attn_mask` (SDPA convention, True = may attend, broadcastable to `(B, H, Q, Q)`) lets extra queries
        (e.g. denoising groups) be kept apart.
        """
        q = tgt + query_pos
        tgt = self.norm2(tgt + _dropout(self.self_attn(q, q, tgt, self_attn_mask), self.dropout, self.training))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm1(tgt + _dropout(tgt2, self.dropout, self.training))
        ffn = self.linear2(_dropout(self.activation(self.linear1(tgt)), self.dropout, self.training))
        return self.norm3(tgt + _dropout(ffn, self.dropout, self.training))


class DabDeformableDecoder(nn.Module):
    """Anchor-box decoder with per-layer box refinement (one `bbox_embed` per layer, the last one included)."""

    def __init__(self, d_model: int, nhead: int, num_layers: int, n_levels: int, n_points: int,
                 dim_feedforward: int, dropout: float, activation: str, inverse_sigmoid_eps: float = 1e-3):
        super().__init__()
        self.d_model = d_model
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.layers = nn.ModuleList(
            DabDeformableDecoderLayer(d_model, nhead, n_levels, n_points, dim_feedforward, dropout, activation)
            for _ in range(num_layers)
        )
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_layers))

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, spatial_shapes, ratios: Tensor,
                memory_padding_mask: Tensor, self_attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Contents `tgt (B, Q, d)`, anchors `reference (B, Q, 4)` (sigmoid cxcywh of the image's valid area),
        `memory (B, S, d)`, valid `ratios (B, L, 2)` -> hidden states `(L_dec, B, Q, d)` and boxes `(L_dec, B, Q, 4)`.

        Box l = sigmoid(bbox_embed[l](out_l) + logit(reference_l)); reference_{l+1} = box_l detached, so each layer
        learns a correction of a fixed box (the anchors themselves train through layer 0).
        """
        output = tgt
        ratios4 = torch.cat((ratios, ratios), -1)[:, None]  # (B, 1, L, 4)
        outputs, boxes = [], []
        for layer_id, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * ratios4  # (B, Q, L, 4) in each level's padded map
            query_pos = self.ref_point_head(anchor_sine_embed(reference_input[:, :, 0], self.d_model // 2))
            if layer_id > 0:
                query_pos = query_pos * self.query_scale(output)
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, memory_padding_mask,
                           self_attn_mask)
            box = (self.bbox_embed[layer_id](output) + inverse_sigmoid(reference, self.inverse_sigmoid_eps)).sigmoid()
            outputs.append(output)
            boxes.append(box)
            reference = box.detach()
        return torch.stack(outputs), torch.stack(boxes)


class DabDeformableTransformer(nn.Module):
    """Level embeddings + deformable encoder + DAB decoder (+ two-stage proposal heads).

    With `two_stage`, `enc_output`/`enc_output_norm` transform the memory, `enc_class_embed`/`enc_bbox_embed`
    score every token and predict a box relative to its cell (w = h = 0.05 * 2^level), and the top
    `num_queries` tokens (by their best class logit) give the decoder its anchors and contents, both detached.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        num_classes: Optional[int] = None,
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableEncoder(
            d_model, nhead, num_encoder_layers, num_feature_levels, enc_n_points, dim_feedforward, dropout, activation
        )
        self.decoder = DabDeformableDecoder(
            d_model, nhead, num_decoder_layers, num_feature_levels, dec_n_points, dim_feedforward, dropout,
            activation, inverse_sigmoid_eps,
        )
        if two_stage:
            if num_classes is None:
                raise ValueError("DabDeformableTransformer: two_stage needs num_classes for the proposal classifier")
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        self._reset_parameters()
        # The heads are created after the xavier pass: they keep nn.Linear's init (the detector head sets biases).
        if two_stage:
            self.enc_class_embed = nn.Linear(d_model, num_classes)
            self.enc_bbox_embed = MLP(d_model, d_model, 4, 3)

    def _reset_parameters(self) -> None:
        # As Deformable DETR: xavier on every matrix, then the deformable attentions' own init, then N(0, 1)
        # level embeddings. The box MLPs are heads and keep nn.Linear's init.
        box_params = {id(p) for p in self.decoder.bbox_embed.parameters()}
        for p in self.parameters():
            if p.dim() > 1 and id(p) not in box_params:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def encode(self, srcs: Sequence[Tensor], masks: Sequence[Tensor], pos_embeds: Sequence[Tensor]):
        """Flatten the levels and run the encoder.

        `srcs`/`pos_embeds [(B, d, h_l, w_l)]`, padding `masks [(B, h_l, w_l)]` -> memory `(B, S, d)`,
        flat padding mask `(B, S)`, `spatial_shapes` [(h, w)], valid ratios `(B, L, 2)`.
        """
        if len(srcs) != self.num_feature_levels:
            raise ValueError(f"DabDeformableTransformer: got {len(srcs)} levels, num_feature_levels="
                             f"{self.num_feature_levels}")
        spatial_shapes = [tuple(src.shape[-2:]) for src in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)], 1
        )
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        ratios = valid_ratios(masks)
        ratios = ratios.to(src.dtype)
        memory = self.encoder(src, pos, encoder_reference_points(spatial_shapes, ratios), spatial_shapes, mask)
        return memory, mask, spatial_shapes, ratios

    def proposals(self, memory: Tensor, mask: Tensor, spatial_shapes) -> Tuple[Tensor, Tensor]:
        """Two-stage proposals: transformed memory `(B, S, d)` and per-token box logits `(B, S, 4)`.

        A token's prior box is its cell centre in its image's valid area with w = h = 0.05 * 2^level; tokens in
        padding, or whose prior is within 0.01 of the border, get +inf logits and zero memory (never picked first).
        """
        priors, start = [], 0
        for level, (h, w) in enumerate(spatial_shapes):
            m = mask[:, start : start + h * w].view(-1, h, w)
            valid_h = (~m[:, :, 0]).sum(1).to(memory.dtype)
            valid_w = (~m[:, 0, :]).sum(1).to(memory.dtype)
            ys = torch.arange(h, dtype=memory.dtype, device=memory.device) + 0.5
            xs = torch.arange(w, dtype=memory.dtype, device=memory.device) + 0.5
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, h * w, 2)
            grid = grid / torch.stack((valid_w, valid_h), -1)[:, None, :]
            priors.append(torch.cat((grid, torch.full_like(grid, 0.05 * 2.0**level)), -1))
            start += h * w
        priors = torch.cat(priors, 1)
        valid = ((priors > 0.01) & (priors < 0.99)).all(-1, keepdim=True) & ~mask[..., None]
        prior_logits = torch.log(priors / (1 - priors)).masked_fill(~valid, float("inf"))
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0.0)))
        return output_memory, prior_logits

    def forward(
        self,
        srcs: Sequence[Tensor],
        masks: Sequence[Tensor],
        pos_embeds: Sequence[Tensor],
        tgt: Optional[Tensor] = None,
        anchors: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
        extra_tgt: Optional[Tensor] = None,
        extra_anchors: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """Single-stage: content queries `tgt (Q, d)` and anchor logits `anchors (Q, 4)` (or batched `(B, Q, .)`,
        e.g. with extra queries, kept apart by `self_attn_mask`). Two-stage: both None.

        `extra_tgt (B, E, d)` / `extra_anchors (B, E, 4)` (anchor logits; e.g. denoising queries) are put in front
        of the queries (single-stage: the given ones; two-stage: the K proposals), so the decoder reads E + Q.

        Returns `hs (L_dec, B, Q, d)`, `boxes (L_dec, B, Q, 4)` and, two-stage, `enc_logits (B, K, C)` /
        `enc_boxes (B, K, 4)` of the K selected proposals (for the encoder loss).
        """
        memory, mask, spatial_shapes, ratios = self.encode(srcs, masks, pos_embeds)
        batch = memory.shape[0]
        out: Dict[str, Tensor] = {}
        if self.two_stage:
            if tgt is not None or anchors is not None:
                raise ValueError("DabDeformableTransformer: two_stage makes its own queries; pass no tgt/anchors")
            output_memory, prior_logits = self.proposals(memory, mask, spatial_shapes)
            enc_logits = self.enc_class_embed(output_memory)
            enc_box_logits = self.enc_bbox_embed(output_memory) + prior_logits
            k = min(self.two_stage_num_proposals, enc_logits.shape[1])
            topk = enc_logits.max(-1)[0].topk(k, dim=1)[1]  # (B, K)
            topk_box_logits = torch.gather(enc_box_logits, 1, topk[..., None].expand(-1, -1, 4))
            topk_memory = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, self.d_model))
            out["enc_logits"] = torch.gather(enc_logits, 1, topk[..., None].expand(-1, -1, enc_logits.shape[-1]))
            out["enc_boxes"] = topk_box_logits.sigmoid()
            tgt, reference = topk_memory.detach(), topk_box_logits.detach().sigmoid()
        else:
            if tgt is None or anchors is None:
                raise ValueError("DabDeformableTransformer: single-stage needs tgt and anchors")
            reference = anchors.sigmoid()
            if tgt.dim() == 2:
                tgt = tgt.expand(batch, -1, -1)
            if reference.dim() == 2:
                reference = reference.expand(batch, -1, -1)
        if (extra_tgt is None) != (extra_anchors is None):
            raise ValueError("DabDeformableTransformer: pass both extra_tgt and extra_anchors, or neither")
        if extra_tgt is not None:
            tgt = torch.cat((extra_tgt, tgt), dim=1)
            reference = torch.cat((extra_anchors.sigmoid().to(reference.dtype), reference), dim=1)
        hs, boxes = self.decoder(tgt, reference, memory, spatial_shapes, ratios, mask, self_attn_mask)
        out["hs"], out["boxes"] = hs, boxes
        return out
