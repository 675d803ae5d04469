"""Multi-scale deformable attention (Deformable DETR, arXiv 2010.04159, Eq. 3) in plain PyTorch.

Each query looks at `n_points` sampled locations per head and per feature level around its reference point
(or inside its reference box) and sums the bilinearly sampled values with softmax weights taken over all
levels x points. Parameter names and initialisation follow Deformable DETR's `MSDeformAttn`
(`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`), so its checkpoints load by name.
No compiled operator: with gradients, sampling is one `F.grid_sample` per level (the only Python loop); without,
one `F.embedding_bag` over all levels, points and bilinear corners (see `ms_deform_attn_sample`).
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import positive_ints


def level_start_index(spatial_shapes: Sequence[Tuple[int, int]]) -> List[int]:
    """Offsets of each level in the flattened `sum(h * w)` token sequence."""
    starts, total = [], 0
    for h, w in spatial_shapes:
        starts.append(total)
        total += h * w
    return starts


SAMPLING_METHODS = ("auto", "grid_sample", "gather")


def ms_deform_attn_sample(
    value: Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    method: str = "auto",
) -> Tensor:
    """The sampling core of Eq. 3.

    `value (B, S, H, Dh)` with S = sum(h * w); `sampling_locations (B, Q, H, L, P, 2)` as (x, y) in [0, 1] of
    each level's padded map; `attention_weights (B, Q, H, L, P)` (already normalised) -> `(B, Q, H * Dh)`.
    Locations outside [0, 1] read zeros (bilinear, align_corners=False, zero padding).

    `method`: "grid_sample" (one `F.grid_sample` per level; differentiable), "gather" (one `F.embedding_bag`
    over all levels, points and bilinear corners; several times faster on CPU, but its backward is slow, so it
    serves inference) or "auto": "gather" when no gradient is needed, "grid_sample" when one is and while
    `torch.export` / `torch.onnx` trace the model (ONNX has no EmbeddingBag; the exporter would write a loop).
    """
    if method == "auto":
        needs_grad = torch.is_grad_enabled() and (
            value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
        )
        method = "grid_sample" if needs_grad or torch.compiler.is_exporting() else "gather"
    if method == "grid_sample":
        return _sample_grid(value, spatial_shapes, sampling_locations, attention_weights)
    if method == "gather":
        return _sample_gather(value, spatial_shapes, sampling_locations, attention_weights)
    raise ValueError(f"ms_deform_attn_sample: method must be one of {SAMPLING_METHODS}, got {method!r}")


def _sample_grid(
    value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """`ms_deform_attn_sample` with one `F.grid_sample` per level."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    # One copy for all levels: (B, S, H, Dh) -> (B*H, Dh, S); each level is then a strided view (b*h, Dh, h, w).
    value = value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, -1)
    # One copy each for all grids and weights, level-major: (L, B*H, Q, P, 2) in grid_sample's [-1, 1] coordinates.
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 1, 4, 5)
    grids = grids.reshape(levels, batch * heads, num_queries, points, 2)
    weights = attention_weights.permute(3, 0, 2, 1, 4).reshape(levels, batch * heads, 1, num_queries, points)
    out = None
    for level, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index(spatial_shapes))):
        value_l = value[:, :, start : start + h * w].unflatten(-1, (h, w))
        sampled = F.grid_sample(value_l, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False)
        # Weighted sum per level, accumulated: concatenating the levels' (B*H, Dh, Q, P) samples first costs a
        # strided copy of all of them (measured on CPU: forward ~15% and forward+backward ~40% slower).
        level_out = (sampled * weights[level]).sum(-1)  # (B*H, Dh, Q)
        out = level_out if out is None else out + level_out
    return out.view(batch, heads * head_dim, num_queries).transpose(1, 2)


def _per_level(like: Tensor, rows: Sequence[Sequence[float]], heads: int, points: int, dtype=None) -> Tensor:
    """`(H, L, P, k)` tensor holding `rows[l]` (k numbers of level l) for every head and point, filled on `like`'s
    device. Materialised rather than broadcast: an op between it and a `(B, Q, H, L, P)` tensor then runs over
    contiguous rows of H*L*P elements instead of P-long pieces (measured: several times faster on CPU)."""
    table = torch.stack([torch.stack([like.new_full((), v, dtype=dtype) for v in row]) for row in rows])
    return table[None, :, None, :].expand(heads, -1, points, -1).contiguous()


def _sample_gather(
    value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """`ms_deform_attn_sample` as one weighted `F.embedding_bag`: the bag of output row (b, q, h) holds the
    4 bilinear corners of its L x P locations, weighted by attention weight x corner weight.

    The values are copied once onto maps with a one-cell zero border, and pixel coordinates are clamped to
    [-1, w] x [-1, h]: every corner then reads a cell that holds its value or zero, exactly as zero padding, with
    no validity masks. The table has one `Dh` row per (image, bordered cell, head) in that order, so neither the
    values nor the output need a permute: the `(B*Q*H, Dh)` result is `(B, Q, H*Dh)`."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    bordered = [(h + 2, w + 2) for h, w in spatial_shapes]
    starts = level_start_index(bordered)
    cells = sum(h * w for h, w in bordered)
    # Corner (x+1, y+1) of a location clamped to (w, h) on the last level lands past its map: zeros there too.
    table = value.new_zeros(batch * cells + 2 * bordered[-1][1], heads * head_dim)
    maps = table[: batch * cells].view(batch, cells, heads * head_dim)
    flat = value.reshape(batch, -1, heads * head_dim)
    for (h, w), start, src in zip(spatial_shapes, starts, level_start_index(spatial_shapes)):
        inner = maps[:, start : start + (h + 2) * (w + 2)].view(batch, h + 2, w + 2, -1)[:, 1:-1, 1:-1]
        inner.copy_(flat[:, src : src + h * w].view(batch, h, w, -1))

    # Index arithmetic in float32 at least: a cell number of one image is exact below 2^24.
    locations = sampling_locations if sampling_locations.dtype == torch.float64 else sampling_locations.float()
    level = _per_level(locations, [(w, h, w + 2, s + w + 3) for (h, w), s in zip(spatial_shapes, starts)],
                       heads, points)
    width, height, row_stride, first_cell = level.unbind(-1)  # (H, L, P) each
    x = torch.addcmul(locations.new_full((), -0.5), locations[..., 0], width).clamp_(min=-1.0)
    y = torch.addcmul(locations.new_full((), -0.5), locations[..., 1], height).clamp_(min=-1.0)
    x, y = torch.minimum(x, width), torch.minimum(y, height)  # (B, Q, H, L, P) pixel coordinates
    x0, y0 = x.floor(), y.floor()
    fx, fy = x.sub_(x0), y.sub_(y0)
    cell = torch.addcmul(x0.add_(first_cell), y0, row_stride)  # the (x0, y0) corner's cell in its image

    index_dtype = torch.int32 if table.numel() // head_dim < 2**31 else torch.int64
    image_and_head = torch.arange(batch, dtype=index_dtype, device=value.device).view(batch, 1, 1) * (cells * heads)
    image_and_head = image_and_head + torch.arange(heads, dtype=index_dtype, device=value.device).view(1, heads, 1)
    image_and_head = image_and_head.expand(batch, heads, levels * points).reshape(batch, 1, heads, levels, points)
    row = torch.add(image_and_head, cell.to(index_dtype), alpha=heads)  # (B, Q, H, L, P) table rows
    corners = _per_level(row, [(0, heads, (w + 2) * heads, (w + 3) * heads) for h, w in spatial_shapes],
                         heads, points, dtype=index_dtype)  # (H, L, P, 4): corner (x0, y0), +x, +y, +x+y
    # corner-major bags (4, L*P): the index and weight tensors are then written in contiguous blocks
    corners = corners.permute(0, 3, 1, 2).contiguous().view(heads, 4, levels * points)
    index = row.view(batch, num_queries, heads, 1, -1) + corners  # (B, Q, H, 4, L*P)
    bag = batch * num_queries * heads
    lower = attention_weights.to(fy.dtype) * fy  # weight x fy: rows y0 + 1
    upper = attention_weights.to(fy.dtype) - lower  # weight x (1 - fy): rows y0
    upper_right, lower_right = upper * fx, lower * fx
    weights = torch.stack((upper - upper_right, upper_right, lower - lower_right, lower_right), 3)
    out = F.embedding_bag(index.reshape(bag, -1), table.view(-1, head_dim),
                          per_sample_weights=weights.reshape(bag, -1).to(value.dtype), mode="sum")
    return out.view(batch, num_queries, heads * head_dim)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: `query (B, Q, d)` attends to `value (B, S, d)` spread over `n_levels` maps.

    `reference_points (B, Q, L, 2)` are (x, y) in [0, 1] per level: offsets are in pixels of that level
    (divided by (w, h)). `(B, Q, L, 4)` are (cx, cy, w, h) boxes: location = (cx, cy) + offset / n_points * (w, h)
    * 0.5, i.e. the points spread inside the box. Callers scale references by each level's valid ratio, as
    Deformable DETR does, so that [0, 1] covers the padded map. `value_padding_mask (B, S)` (True = padding)
    zeroes those values before sampling, so padding never contributes. `sampling` is `ms_deform_attn_sample`'s
    `method` ("auto": the `embedding_bag` gather when no gradient is needed, `grid_sample` otherwise).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 sampling: str = "auto"):
        super().__init__()
        positive_ints("MSDeformAttn", d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if sampling not in SAMPLING_METHODS:
            raise ValueError(f"MSDeformAttn: sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")
        self.sampling = sampling
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of H directions, point i at distance i+1; uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack((thetas.cos(), thetas.sin()), -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # onto the unit square's border
        grid = grid[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        value_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """`query (B, Q, d)` (position already added), `reference_points (B, Q, L, 2 | 4)`, `value (B, S, d)`,
        `spatial_shapes` L pairs (h, w) with sum(h * w) = S, `value_padding_mask (B, S)` -> `(B, Q, d)`."""
        batch, num_queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != levels:
            raise ValueError(f"MSDeformAttn: got {len(spatial_shapes)} levels, n_levels={levels}")
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (heads, -1))

        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        ref = reference_points[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 2|4)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: times (1 / w, 1 / h), stored per (head, level, point) (see
            # `_per_level`: half the time of a divide by an (L, 1, 2) tensor)
            inverse_wh = _per_level(offsets, [(1.0 / w, 1.0 / h) for h, w in spatial_shapes], heads, points)
            locations = torch.addcmul(ref, offsets, inverse_wh)
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets * (ref[..., 2:] * (0.5 / points))
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        return self.output_proj(ms_deform_attn_sample(value, spatial_shapes, locations, weights, self.sampling))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"
