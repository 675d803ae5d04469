"""DAB-DETR transformer: encoder with scaled positional embeddings, and a decoder whose queries are anchor boxes.

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md).

Layout is batch-first throughout: tokens are `(B, L, d)`. Names follow the paper and the official code
(`anchor`, `reference`, `query_pos`, `query_sine_embed`, `sa_*` / `ca_*` projections).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention, PreProjectedAttention, key_padding_to_attn_mask
from .box_ops import inverse_sigmoid
from .mlp import MLP
from .position_encoding import anchor_sine_embed

ACTIVATIONS = ("relu", "gelu", "prelu")
QUERY_SCALE_TYPES = ("cond_elewise", "cond_scalar", "fix_elewise")


class _ScalarPReLU(torch.autograd.Function):
    """PReLU with one slope `a (1,)`, forward and backward in a few elementwise passes.

    torch's PReLU backward kernel is 2-3x slower on the CPU than this at FFN sizes (and slower still in bf16). With
    `g_pos = g if x > 0 else 0` (ReLU's backward kernel): `dx = g_pos + a (g - g_pos)` (one `lerp`) and
    `da = sum(min(x, 0) g)`, summed in fp32 — the same as F.prelu's gradients, x = 0 included (slope `a` there).
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor) -> Tensor:
        ctx.save_for_backward(x, a)
        return _prelu_value(x, a)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, Tensor]:
        x, a = ctx.saved_tensors
        grad_x = torch.lerp(torch.ops.aten.threshold_backward(grad, x, 0), grad, a.to(grad.dtype))
        if grad.dtype == torch.float32:
            grad_a = torch.dot(x.clamp(max=0).flatten(), grad.flatten())  # no product tensor written
        else:
            grad_a = (x.clamp(max=0) * grad).sum(dtype=torch.float32)
        return grad_x, grad_a.reshape(a.shape).to(a.dtype)


def _prelu_value(x: Tensor, a: Tensor) -> Tensor:
    """F.prelu; bf16 CPU inputs as `relu(x) - a relu(-x)` (torch's bf16 PReLU kernel is slow there)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.relu(x) - a.to(x.dtype) * F.relu(-x)
    return F.prelu(x, a.to(x.dtype))


class PReLU(nn.PReLU):
    """`nn.PReLU` (same parameter, same function) made fast for the FFN's single slope: in training
    `_ScalarPReLU` (its own backward, 2x faster than torch's at the synthetic model's FFN size, fp32 and bf16),
    without gradients F.prelu (what export traces), bf16 CPU inputs as `relu(x) - a relu(-x)`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.num_parameters != 1:
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _ScalarPReLU.apply(x, self.weight)
        return _prelu_value(x, self.weight)


class ReLU(nn.ReLU):
    """`nn.ReLU`, in place when no gradient is recorded: the FFN's hidden activations are its largest tensor (R50
    DAB-Deformable-DETR inference at 640 took 0.92x the time). In training in place measured slower (1.07-1.11x
    the step), so it stays out of place there."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x, inplace=not torch.is_grad_enabled())


def build_activation(activation: str) -> nn.Module:
    """FFN activation by name; PReLU (one learned slope, init 0.25) is DAB-DETR's."""
    if activation == "relu":
        return ReLU()
    if activation == "gelu":
        return nn.GELU()
    if activation == "prelu":
        return PReLU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, training) if p > 0 and training else x


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: q = k = src + pos, v = src; then FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.activation = build_activation(activation)
        self.dropout = dropout

    def forward(self, src: Tensor, pos: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """`src`, `pos (B, HW, d)`, `attn_mask (B, 1, 1, HW)` -> `(B, HW, d)`."""
        q = src + pos
        src = self.norm1(src + _dropout(self.self_attn(q, q, src, attn_mask), self.dropout, self.training))
        ffn = self.linear2(_dropout(self.activation(self.linear1(src)), self.dropout, self.training))
        return self.norm2(src + _dropout(ffn, self.dropout, self.training))


class TransformerEncoder(nn.Module):
    """Encoder layers; each layer's positional embedding is scaled element-wise by `query_scale(src)` (DAB-DETR)."""

    def __init__(
        self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float, activation: str
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation) for _ in range(num_layers)
        )
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: Tensor, pos: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), attn_mask)
        return src


class TransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: conditional self-attention, conditional cross-attention, FFN.

    Self-attention: `q = sa_qcontent(tgt) + sa_qpos(query_pos)`, `k` likewise, `v = sa_v(tgt)`.
    Cross-attention: per head, query = [content (+ `ca_qpos_proj(query_pos)` when `use_query_pos`),
    `ca_qpos_sine_proj(query_sine_embed)`], key = [content (+ key pos when `use_query_pos`), `ca_kpos_proj(pos)`],
    so q/k heads are `2d/H` wide and v heads `d/H`.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: str,
        use_query_pos: bool,
        rm_self_attn_decoder: bool = False,
    ):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.rm_self_attn_decoder = rm_self_attn_decoder
        if not rm_self_attn_decoder:
            self.sa_qcontent_proj = nn.Linear(d_model, d_model)
            self.sa_qpos_proj = nn.Linear(d_model, d_model)
            self.sa_kcontent_proj = nn.Linear(d_model, d_model)
            self.sa_kpos_proj = nn.Linear(d_model, d_model)
            self.sa_v_proj = nn.Linear(d_model, d_model)
            self.self_attn = PreProjectedAttention(d_model, nhead, dropout)
            self.norm1 = nn.LayerNorm(d_model)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        # The box's positional query joins the content query in layer 0 only (unless keep_query_pos).
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if use_query_pos else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = PreProjectedAttention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = build_activation(activation)

    def _per_head_concat(self, a: Tensor, b: Tensor) -> Tensor:
        """`(B, L, d)`, `(B, L, d)` -> `(B, L, 2d)` with head `h` = [a's head h, b's head h]."""
        return torch.cat((a.unflatten(-1, (self.nhead, -1)), b.unflatten(-1, (self.nhead, -1))), dim=-1).flatten(-2)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        query_sine_embed: Tensor,
        memory_attn_mask: Optional[Tensor],
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """`tgt`, `query_pos`, `query_sine_embed (B, Nq, d)`; `memory`, `pos (B, HW, d)` -> `(B, Nq, d)`.

        `self_attn_mask (B, 1, Nq, Nq)` bool (True = may attend): which queries each query sees (denoising training).
        """
        if not self.rm_self_attn_decoder:
            q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
            k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
            tgt2 = self.self_attn(q, k, self.sa_v_proj(tgt), self_attn_mask)
            tgt = self.norm1(tgt + _dropout(tgt2, self.dropout, self.training))

        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = self._per_head_concat(q, self.ca_qpos_sine_proj(query_sine_embed))
        k = self._per_head_concat(k, k_pos)
        tgt2 = self.cross_attn(q, k, self.ca_v_proj(memory), memory_attn_mask)
        tgt = self.norm2(tgt + _dropout(tgt2, self.dropout, self.training))

        ffn = self.linear2(_dropout(self.activation(self.linear1(tgt)), self.dropout, self.training))
        return self.norm3(tgt + _dropout(ffn, self.dropout, self.training))


class TransformerDecoder(nn.Module):
    """Decoder over anchor boxes with layer-by-layer box refinement.

    Per layer, from the reference boxes `r` (sigmoid space): `query_sine_embed = PE(r)` (y, x, w, h),
    `query_pos = ref_point_head(query_sine_embed)`; the (y, x) half of the sine embedding, scaled by
    `query_scale(output)` and, with `modulate_hw_attn`, by `ref_anchor_head(output) / (w, h)`, is the positional
    part of the cross-attention query. After the layer, `new_r = sigmoid(bbox_embed(output) + logit(r))`.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        activation: str,
        query_scale_type: str = "cond_elewise",
        modulate_hw_attn: bool = True,
        keep_query_pos: bool = False,
        rm_self_attn_decoder: bool = False,
        bbox_embed_diff_each_layer: bool = False,
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        if query_scale_type not in QUERY_SCALE_TYPES:
            raise ValueError(f"query_scale_type must be one of {QUERY_SCALE_TYPES}, got {query_scale_type!r}")
        self.d_model = d_model
        self.num_layers = num_layers
        self.query_scale_type = query_scale_type
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(
                d_model, nhead, dim_feedforward, dropout, activation,
                use_query_pos=(i == 0 or keep_query_pos), rm_self_attn_decoder=rm_self_attn_decoder,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        if query_scale_type == "cond_elewise":
            self.query_scale = MLP(d_model, d_model, d_model, 2)
        elif query_scale_type == "cond_scalar":
            self.query_scale = MLP(d_model, d_model, 1, 2)
        else:
            self.query_scale = nn.Embedding(num_layers, d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        # The box head's MLP; the detector head reads it from here (one copy in the state dict).
        if bbox_embed_diff_each_layer:
            self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_layers))
        else:
            self.bbox_embed = MLP(d_model, d_model, 4, 3)

    def box_delta(self, hidden: Tensor, layer_id: int) -> Tensor:
        """`bbox_embed` of decoder layer `layer_id` (shared unless `bbox_embed_diff_each_layer`)."""
        if isinstance(self.bbox_embed, nn.ModuleList):
            return self.bbox_embed[layer_id](hidden)
        return self.bbox_embed(hidden)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        reference: Tensor,
        memory_attn_mask: Optional[Tensor],
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Content queries `tgt (B, Nq, d)`, `memory`/`pos (B, HW, d)`, anchors `reference (B, Nq, 4)` (sigmoid),
        optional query-to-query `self_attn_mask (B, 1, Nq, Nq)` (True = may attend).

        Returns hidden states after the final LayerNorm `(L, B, Nq, d)` and each layer's input reference
        `(L, B, Nq, 4)`: the anchors, then each refinement *before* `detach`, so layer l's box loss also trains
        layer l-1's update, while layer l itself only sees the detached box.
        """
        d = self.d_model
        output = tgt
        outputs, references = [], [reference]
        for layer_id, layer in enumerate(self.layers):
            query_sine_embed = anchor_sine_embed(reference, d // 2)  # (B, Nq, 2d): y, x, w, h
            query_pos = self.ref_point_head(query_sine_embed)
            query_sine_embed = query_sine_embed[..., :d]  # the (y, x) part feeds cross-attention
            if self.query_scale_type == "fix_elewise":
                query_sine_embed = query_sine_embed * self.query_scale.weight[layer_id]
            elif layer_id > 0:  # layer 0's content is empty: no transformation
                query_sine_embed = query_sine_embed * self.query_scale(output)
            if self.ref_anchor_head is not None:
                # Modulated attention: widen/narrow the x (y) Gaussian-like kernel by w_ref / w (h_ref / h).
                ref_wh = self.ref_anchor_head(output).sigmoid()
                hw_ratio = (ref_wh / reference[..., 2:]).flip(-1)  # (h ratio, w ratio) for the (y, x) halves
                query_sine_embed = (query_sine_embed.unflatten(-1, (2, d // 2)) * hw_ratio[..., None]).flatten(-2)

            output = layer(output, memory, pos, query_pos, query_sine_embed, memory_attn_mask, self_attn_mask)
            outputs.append(output)
            if layer_id < self.num_layers - 1:  # the last layer's boxes are made by the head
                new_reference = (
                    self.box_delta(output, layer_id) + inverse_sigmoid(reference, self.inverse_sigmoid_eps)
                ).sigmoid()
                references.append(new_reference)
                reference = new_reference.detach()
        return self.norm(torch.stack(outputs)), torch.stack(references)


class DabDetrTransformer(nn.Module):
    """Encoder + anchor-box decoder. Content queries are zeros, or with `num_patterns` > 0 each pattern embedding
    repeated over all anchors (pattern-major order, `num_patterns * num_queries` queries, as Anchor DETR)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
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
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_patterns = num_patterns
        self.encoder = TransformerEncoder(d_model, nhead, num_encoder_layers, dim_feedforward, dropout, activation)
        self.decoder = TransformerDecoder(
            d_model, nhead, num_decoder_layers, dim_feedforward, dropout, activation,
            query_scale_type=query_scale_type, modulate_hw_attn=modulate_hw_attn, keep_query_pos=keep_query_pos,
            rm_self_attn_decoder=rm_self_attn_decoder, bbox_embed_diff_each_layer=bbox_embed_diff_each_layer,
            inverse_sigmoid_eps=inverse_sigmoid_eps,
        )
        self._reset_parameters()
        # Created after the xavier init, as the official code does: the patterns keep N(0, 1).
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None

    @property
    def num_patterns_or_one(self) -> int:
        """P: each anchor gives P matching queries."""
        return max(self.num_patterns, 1)

    def _reset_parameters(self) -> None:
        # xavier on every matrix of the transformer; the box MLP keeps nn.Linear's init (it is a head).
        bbox_params = {id(p) for p in self.decoder.bbox_embed.parameters()}
        for p in self.parameters():
            if p.dim() > 1 and id(p) not in bbox_params:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,
        mask: Tensor,
        pos: Tensor,
        anchors: Tensor,
        extra_content: Optional[Tensor] = None,
        extra_anchors: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """`src`, `pos (B, d, H, W)`, padding `mask (B, H, W)` (True = padding), `anchors (Nq, 4)` (logits).

        Returns `hs (L, B, P*Nq, d)` (normed decoder outputs) and `references (L, B, P*Nq, 4)` (sigmoid space),
        P = max(num_patterns, 1). Denoising training puts `N` extra queries *before* these: `extra_content (B, N, d)`,
        `extra_anchors (B, N, 4)` (logits), with `self_attn_mask (B, 1, N+P*Nq, N+P*Nq)`; the outputs then have
        N + P*Nq queries.
        """
        batch = src.shape[0]
        memory = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        attn_mask = key_padding_to_attn_mask(mask.flatten(1))  # built once, shared by all layers
        memory = self.encoder(memory, pos, attn_mask)

        reference = anchors.sigmoid()
        if self.patterns is None:
            tgt = memory.new_zeros(batch, anchors.shape[0], self.d_model)
        else:
            tgt = self.patterns.weight.repeat_interleave(anchors.shape[0], dim=0).expand(batch, -1, -1)
            reference = reference.repeat(self.num_patterns, 1)
        reference = reference.expand(batch, -1, -1)
        if extra_content is not None:
            tgt = torch.cat((extra_content.to(tgt.dtype), tgt), dim=1)
            reference = torch.cat((extra_anchors.sigmoid().to(reference.dtype), reference), dim=1)
        return self.decoder(tgt, memory, pos, reference, attn_mask, self_attn_mask)
