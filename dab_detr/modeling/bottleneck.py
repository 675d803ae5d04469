"""ResNet's bottleneck block (1x1 -> 3x3 -> 1x1, residual, ReLU) on channels_last activations, as one autograd node
(or a chain of blocks as one node).

The block is the same function as conv + ReLU + conv + ReLU + conv + shortcut + add + ReLU with per-channel biases
(FrozenBN folded into the convolutions), but written as one node it needs fewer passes over its largest tensors:
- forward: the shortcut (the input, or its 1x1 projection) and the last bias are written first and the last 1x1
  convolution is accumulated onto them by the GEMM (`addmm_`, beta = 1), so there is no separate residual add;
- backward: the input gradient of the first 1x1 convolution is accumulated by its GEMM onto the shortcut's
  gradient, which autograd would otherwise compute separately and add in a fresh buffer; the ReLU masks of the two
  inner activations are applied in place to gradients the block owns.
The blocks of a stage run as one node too (`bottleneck_chain`): the gradient that one block hands the block
before it is then a buffer of the node's own, and that block's output ReLU mask goes into it in place.
The 3x3 convolution runs through torch (`F.conv2d`, `aten.convolution_backward`). The 1x1 convolutions are GEMMs
over the `(B*H*W, C)` view of NHWC tensors (as in `conv.py`), the strided projection shortcut one over the
subsampled input.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv import kernel_matrix, pixel_rows, pointwise_conv, pointwise_weight_grad

_CL = torch.channels_last
_threshold_backward = torch.ops.aten.threshold_backward


def _empty_cl(batch: int, channels: int, height: int, width: int, like: Tensor) -> Tensor:
    return torch.empty((batch, channels, height, width), dtype=like.dtype, device=like.device, memory_format=_CL)


def _subsample(x: Tensor, stride: int) -> Tensor:
    """`x[:, :, ::stride, ::stride]` as a channels_last tensor (what a strided 1x1 convolution reads)."""
    return x if stride == 1 else x[:, :, ::stride, ::stride].contiguous(memory_format=_CL)


def _weight_grad(grad: Tensor, x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """dL/dW `(K, C, 1, 1)` of a 1x1 convolution of `x (B, C, H, W)` with stride `stride`, from its output gradient
    `grad (B, K, H', W')`."""
    return pointwise_weight_grad(pixel_rows(grad), _subsample(x, stride), weight)


def _relu_backward_(grad: Tensor, output: Tensor) -> Tensor:
    """grad * (output > 0), in place in `grad`."""
    return _threshold_backward(grad, output, 0, grad_input=grad)


class Block(NamedTuple):
    """One bottleneck block's folded convolutions and geometry. `conv1`, `conv3`, `shortcut`: (weight (K, C, 1, 1),
    bias (K,)) of 1x1 convolutions (the shortcut strided by `stride`, identity if None); `conv2`: (weight, bias) of
    the 3x3 convolution, stride `stride`, padding and dilation `dilation`, `groups`."""

    conv1: Tuple[Tensor, Tensor]
    conv2: Tuple[Tensor, Tensor]
    conv3: Tuple[Tensor, Tensor]
    shortcut: Optional[Tuple[Tensor, Tensor]] = None
    stride: int = 1
    dilation: int = 1
    groups: int = 1


_SLOTS = 8  # tensors per block in `_BottleneckChain.apply`: w1, b1, w2, b2, w3, b3, ws, bs (None: identity)


def _block_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
                   ws: Optional[Tensor], bs: Optional[Tensor], stride: int, dilation: int, groups: int):
    """(out, h1, h2): the block's output and its two inner activations (after their ReLUs)."""
    h1 = pointwise_conv(x, w1, b1).relu_()
    h2 = F.conv2d(h1, w2, b2, stride, dilation, dilation, groups).contiguous(memory_format=_CL).relu_()
    if ws is None:
        out = torch.add(x, b3.view(1, -1, 1, 1), out=_empty_cl(*x.shape, like=x))
    else:
        out = pointwise_conv(_subsample(x, stride), ws, b3 + bs)
    pixel_rows(out).addmm_(pixel_rows(h2), kernel_matrix(w3).t())
    return out.relu_(), h1, h2


def _block_backward(grad: Tensor, grad_is_ours: bool, saved: Sequence[Optional[Tensor]], stride: int,
                    dilation: int, groups: int, need: Sequence[bool]) -> List[Optional[Tensor]]:
    """Gradients (x, w1, b1, w2, b2, w3, b3, ws, bs) of one block from the gradient of its output; `need`: which
    of them are wanted, in that order. `saved`: (x, h1, h2, out, w1, w2, w3, ws). `grad_is_ours`: `grad` is a
    buffer of this backward's own (the input gradient of the block after it), so the ReLU mask goes in place."""
    x, h1, h2, out, w1, w2, w3, ws = saved
    if grad_is_ours and grad.is_contiguous(memory_format=_CL):
        g = _relu_backward_(grad, out)  # dL/d(out before the last ReLU)
    else:
        g = _threshold_backward(grad, out, 0).contiguous(memory_format=_CL)
    g_rows = pixel_rows(g)
    d_w3 = _weight_grad(g, h2, w3) if need[5] else None
    d_b3 = g_rows.sum(0) if need[6] or need[8] else None

    d_h2 = _empty_cl(*h2.shape, like=h2)
    torch.mm(g_rows, kernel_matrix(w3), out=pixel_rows(d_h2))
    _relu_backward_(d_h2, h2)
    d_h1, d_w2, d_b2 = torch.ops.aten.convolution_backward(
        d_h2, h1, w2, [w2.shape[0]], [stride] * 2, [dilation] * 2, [dilation] * 2, False, [0, 0], groups,
        [True, need[3], need[4]],
    )
    d_h1 = _relu_backward_(d_h1.contiguous(memory_format=_CL), h1)
    d_h1_rows = pixel_rows(d_h1)
    d_w1 = _weight_grad(d_h1, x, w1) if need[1] else None
    d_b1 = d_h1_rows.sum(0) if need[2] else None

    d_x = d_ws = None
    if ws is not None and need[7]:
        d_ws = _weight_grad(g, x, ws, stride)
    if need[0]:
        if ws is None:  # identity shortcut: d_x = g + d_h1 @ W1, accumulated in g's buffer
            d_x = g
            g_rows.addmm_(d_h1_rows, kernel_matrix(w1))
        else:
            d_x = _empty_cl(*x.shape, like=x)
            torch.mm(d_h1_rows, kernel_matrix(w1), out=pixel_rows(d_x))
            if stride == 1:
                pixel_rows(d_x).addmm_(g_rows, kernel_matrix(ws))
            else:
                d_shortcut = g_rows.mm(kernel_matrix(ws)).view(g.shape[0], g.shape[2], g.shape[3], -1)
                d_x[:, :, ::stride, ::stride] += d_shortcut.permute(0, 3, 1, 2)
    return [d_x, d_w1, d_b1, d_w2, d_b2, d_w3, d_b3 if need[6] else None, d_ws, d_b3 if need[8] else None]


def _chain_forward(x: Tensor, geometry: Sequence[Tuple[int, int, int]], weights: Sequence[Optional[Tensor]],
                   saved: Optional[List[Optional[Tensor]]] = None) -> Tensor:
    """The blocks one after the other (`weights`: `_SLOTS` per block, `geometry`: (stride, dilation, groups) per
    block). With `saved`, each block's backward inputs (x, h1, h2, out, w1, w2, w3, ws) are appended to it;
    without, each block's activations go as it ends."""
    for i, (stride, dilation, groups) in enumerate(geometry):
        w1, b1, w2, b2, w3, b3, ws, bs = weights[_SLOTS * i : _SLOTS * (i + 1)]
        out, h1, h2 = _block_forward(x, w1, b1, w2, b2, w3, b3, ws, bs, stride, dilation, groups)
        if saved is not None:
            saved += [x, h1, h2, out, w1, w2, w3, ws]
        x = out
    return x


class _BottleneckChain(torch.autograd.Function):
    """Blocks applied one after the other, as one node: the gradient between two blocks is a buffer the backward
    made itself, so the ReLU mask of the earlier block's output goes into it in place (one fresh buffer and one
    pass fewer per block than a node per block, whose incoming gradient autograd may share)."""

    @staticmethod
    def forward(ctx, x: Tensor, geometry: Tuple[Tuple[int, int, int], ...], *weights: Optional[Tensor]) -> Tensor:
        saved: List[Optional[Tensor]] = []
        out = _chain_forward(x, geometry, weights, saved)
        ctx.save_for_backward(*saved)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved, geometry = ctx.saved_tensors, ctx.geometry
        need_weights = ctx.needs_input_grad[2:]
        grads: List[Optional[Tensor]] = [None] * len(need_weights)
        for i in reversed(range(len(geometry))):
            # block i's input gradient is wanted if the chain's input or a weight of an earlier block wants one
            need_x = ctx.needs_input_grad[0] or any(need_weights[: _SLOTS * i])
            need = [need_x, *need_weights[_SLOTS * i : _SLOTS * (i + 1)]]
            block_grads = _block_backward(grad, i < len(geometry) - 1, saved[_SLOTS * i : _SLOTS * (i + 1)],
                                          *geometry[i], need)
            grads[_SLOTS * i : _SLOTS * (i + 1)] = block_grads[1:]
            grad = block_grads[0]
            if grad is None:
                break
        return (grad, None, *grads)


def bottleneck_chain(x: Tensor, blocks: Sequence[Block]) -> Tensor:
    """The blocks of a ResNet stage (or a run of them) one after the other, each
    relu(conv3(relu(conv2(relu(conv1(x))))) + shortcut(x)), for a channels_last fp32 `x (B, C, H, W)`: one autograd
    node. Returns `(B, K3, H / s, W / s)` (s: the product of the blocks' strides), channels_last."""
    weights: List[Optional[Tensor]] = []
    for block in blocks:
        weights += [*block.conv1, *block.conv2, *block.conv3, *(block.shortcut or (None, None))]
    geometry = tuple((block.stride, block.dilation, block.groups) for block in blocks)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights)):
        return _BottleneckChain.apply(x, geometry, *weights)
    return _chain_forward(x, geometry, weights)  # nothing to record: nothing saved


def bottleneck(x: Tensor, conv1: Tuple[Tensor, Tensor], conv2: Tuple[Tensor, Tensor], conv3: Tuple[Tensor, Tensor],
               shortcut: Optional[Tuple[Tensor, Tensor]] = None, stride: int = 1, dilation: int = 1,
               groups: int = 1) -> Tensor:
    """One block (`Block`'s fields): `bottleneck_chain(x, [Block(conv1, conv2, conv3, shortcut, stride, dilation,
    groups)])`."""
    return bottleneck_chain(x, [Block(conv1, conv2, conv3, shortcut, stride, dilation, groups)])
