"""Sine position encodings: the 2-D image encoding of the encoder and the anchor-box encoding of the decoder.

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md).

Both use one routine, `sine_embed`: each coordinate `c` becomes `num_pos_feats` features
`[sin(c / t_0), cos(c / t_0), sin(c / t_1), cos(c / t_1), ...]` with `t_i = T ** (2 * i / num_pos_feats)`
(sin on even, cos on odd indices, interleaved, as the official code does).
"""
import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn


def sine_embed(
    coords: Tensor,
    num_pos_feats: int,
    temperature: Union[float, Sequence[float]] = 10000.0,
    scale: float = 2 * math.pi,
) -> Tensor:
    """Encode every coordinate of `(..., n)` into `num_pos_feats` sine/cosine features -> `(..., n * num_pos_feats)`.

    `temperature` is one value for all coordinates or a sequence of `n` values, one per coordinate.
    Coordinates are multiplied by `scale` first.
    """
    if num_pos_feats % 2:
        raise ValueError(f"sine_embed: num_pos_feats must be even, got {num_pos_feats}")
    exponent = 2 * (torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device) // 2) / num_pos_feats
    if isinstance(temperature, (int, float)):
        dim_t = temperature**exponent  # (F,)
    else:
        if len(temperature) != coords.shape[-1]:
            raise ValueError(
                f"sine_embed: got {len(temperature)} temperatures for {coords.shape[-1]} coordinates"
            )
        dim_t = torch.stack([t**exponent for t in temperature])  # (n, F); no host-to-device copy
    x = (coords.float() * scale)[..., None] / dim_t  # (..., n, F)
    x = torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
    return x.flatten(-2)


def anchor_sine_embed(anchors: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Anchor Sine Encoding of sigmoid-space `(..., 2)` (x, y) or `(..., 4)` (x, y, w, h) -> `(..., 2F)` / `(..., 4F)`.

    Output order is (y, x) or (y, x, w, h), scale 2*pi. The temperature is 10000 as in the released code
    (the paper says 20; the authors call the code's value a bug but the released weights use it).
    """
    if anchors.shape[-1] not in (2, 4):
        raise ValueError(f"anchor_sine_embed: anchors must end in 2 or 4 coordinates, got shape {tuple(anchors.shape)}")
    # swap x and y with slices (list indexing would copy an index tensor to the device every call)
    yx_rest = torch.cat((anchors[..., 1:2], anchors[..., 0:1], anchors[..., 2:]), dim=-1)
    return sine_embed(yx_rest, num_pos_feats, temperature)


class PositionEmbeddingSine(nn.Module):
    """2-D sine position embedding of the unpadded area: padding mask `(B, H, W)` (True = padding) -> `(B, 2F, H, W)`.

    Channels are `(pos_y, pos_x)`, F = `num_pos_feats` each. With `normalize`, the cumulative row/column counts are
    divided by the image's own height/width (+ eps) and multiplied by `scale`, with no -0.5 offset (as DAB-DETR).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature_h: float = 20.0,
        temperature_w: float = 20.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
    ):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(
                f"PositionEmbeddingSine: mask must be a (B, H, W) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = y_embed / (y_embed[:, -1:, :] + self.eps)
            x_embed = x_embed / (x_embed[:, :, -1:] + self.eps)
        scale = self.scale if self.normalize else 1.0
        pos = sine_embed(
            torch.stack((y_embed, x_embed), dim=-1), self.num_pos_feats, (self.temperature_h, self.temperature_w), scale
        )
        return pos.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature_h={self.temperature_h}, "
            f"temperature_w={self.temperature_w}, normalize={self.normalize}"
        )
