"""Batch-first multi-head attention on `F.scaled_dot_product_attention`.

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md).

DAB-DETR's conditional cross-attention concatenates content and position per head, so its query/key heads are
twice as wide as its value heads: `multi_head_attention` allows a q/k head dim different from the v head dim.
"""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def key_padding_to_attn_mask(key_padding_mask: Tensor) -> Tensor:
    """`(B, Lk)` bool, True = padding -> `(B, 1, 1, Lk)` bool SDPA mask, True = may attend."""
    return ~key_padding_mask[:, None, None, :]


def multi_head_attention(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0
) -> Tensor:
    """Attention of already projected `q (B, Lq, Dqk)`, `k (B, Lk, Dqk)`, `v (B, Lk, Dv)` -> `(B, Lq, Dv)`.

    Head `h` uses q/k columns `[h * Dqk/H, (h+1) * Dqk/H)` and v columns `[h * Dv/H, (h+1) * Dv/H)`;
    the softmax scale is `(Dqk/H) ** -0.5`. `attn_mask` is an SDPA mask broadcastable to `(B, H, Lq, Lk)`.
    """
    batch, len_q, _ = q.shape
    q = q.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    k = k.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    v = v.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    head_dim_v = v.shape[-1]
    dtype = q.dtype
    # Under CPU autocast: torch's CPU SDPA in bf16 is 2-5x slower than in fp32 at these head dims (its backward
    # above all: a bf16 training step of the synthetic model spent more time in it than the fp32 step in total),
    # so it runs in fp32 (autocast off, or it would cast back) and keeps the softmax exact.
    fp32_on_cpu = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if fp32_on_cpu:
        q, k, v = q.float(), k.float(), v.float()
    if head_dim_v < q.shape[-1]:
        # SDPA's fused kernels need equal head dims; its unfused fallback is ~2x slower on CPU than the fused
        # kernel with v zero-padded to the q/k head dim (the padded output columns are dropped, the scale is
        # set by q anyway).
        v = F.pad(v, (0, q.shape[-1] - head_dim_v))
    with torch.autocast("cpu", enabled=False) if fp32_on_cpu else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)[..., :head_dim_v]
    return out.transpose(1, 2).reshape(batch, len_q, -1).to(dtype)


def _check_heads(name: str, dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"{name}: embed_dim ({dim}) must be divisible by num_heads ({num_heads})")


class MultiheadAttention(nn.Module):
    """Standard multi-head attention (the encoder's), batch-first, with `nn.MultiheadAttention`'s parameter layout
    (`in_proj_weight` = [Wq; Wk; Wv], `in_proj_bias`, `out_proj`). Dropout `dropout` on the attention weights."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        _check_heads("MultiheadAttention", embed_dim, num_heads)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """`query (B, Lq, d)`, `key`/`value (B, Lk, d)` -> `(B, Lq, d)`."""
        d = self.embed_dim
        if query is key:  # encoder self-attention: q = k = src + pos, one GEMM for both projections
            q, k = F.linear(query, self.in_proj_weight[: 2 * d], self.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        else:
            q = F.linear(query, self.in_proj_weight[:d], self.in_proj_bias[:d])
            k = F.linear(key, self.in_proj_weight[d : 2 * d], self.in_proj_bias[d : 2 * d])
        v = F.linear(value, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        dropout_p = self.dropout if self.training else 0.0
        return self.out_proj(multi_head_attention(q, k, v, self.num_heads, attn_mask, dropout_p))


class PreProjectedAttention(nn.Module):
    """Multi-head attention whose q/k/v projections live outside (the decoder's conditional self- and
    cross-attention): only `out_proj`. q/k may be wider than v (`(B, L, 2d)` vs `(B, L, d)` in cross-attention)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        _check_heads("PreProjectedAttention", embed_dim, num_heads)
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        """`q (B, Lq, Dqk)`, `k (B, Lk, Dqk)`, `v (B, Lk, embed_dim)` -> `(B, Lq, embed_dim)`."""
        dropout_p = self.dropout if self.training else 0.0
        return self.out_proj(multi_head_attention(q, k, v, self.num_heads, attn_mask, dropout_p))
