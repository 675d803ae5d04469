"""Convolution of NHWC (channels_last) activations: a 1x1, stride-1 convolution is one GEMM over the pixels.

On the CPU, torch runs such a convolution through oneDNN or (one thread, small batch) its im2col fallback; as a
matrix product over the NHWC view of the input it is the same product with no layout work in or out, and measured
0.85-0.95x the time (forward + backward, 1 and 2 threads, ResNet-50's and the synthetic model's shapes).
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_Pair = Union[int, Sequence[int]]


def _all_equal(value: _Pair, target: int) -> bool:
    """`stride=1`, `padding=(0, 0)`, ...: an int or pair whose every entry is `target`."""
    return all(v == target for v in ((value, value) if isinstance(value, int) else value))


def pixel_rows(t: Tensor) -> Tensor:
    """`(B*H*W, C)` view of a channels_last `(B, C, H, W)` tensor."""
    return t.permute(0, 2, 3, 1).view(-1, t.shape[1])


def kernel_matrix(weight: Tensor) -> Tensor:
    """`(K, C)` of a 1x1 kernel `(K, C, 1, 1)`."""
    return weight.reshape(weight.shape[0], weight.shape[1])


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """1x1 convolution of a channels_last `x (B, C, H, W)` as one GEMM on its pixel rows (no autograd node of its
    own); the output `(B, K, H, W)` is a channels_last tensor of its own, not a view."""
    batch, _, height, width = x.shape
    out = torch.empty((batch, weight.shape[0], height, width), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    if bias is None:
        torch.mm(pixel_rows(x), kernel_matrix(weight).t(), out=pixel_rows(out))
    else:
        torch.addmm(bias, pixel_rows(x), kernel_matrix(weight).t(), out=pixel_rows(out))
    return out


def pointwise_weight_grad(grad_rows: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """dL/dW `(K, C, 1, 1)` of `pointwise_conv(x, weight)` from the output gradient's pixel rows `(B*H*W, K)`."""
    return grad_rows.t().mm(pixel_rows(x)).view(weight.shape)


class _PointwiseConvNHWC(torch.autograd.Function):
    """`pointwise_conv` with its backward, also GEMMs on the pixel rows. The output is a tensor of its own, so
    in-place ops after it (ResNet's `out += shortcut`, `relu_`) cost nothing extra."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return pointwise_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        batch, channels, height, width = x.shape
        grad_2d = grad.permute(0, 2, 3, 1).reshape(-1, weight.shape[0])  # a view when grad is channels_last
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_2d.mm(kernel_matrix(weight)).view(batch, height, width, channels).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_weight = pointwise_weight_grad(grad_2d, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def _im2col_fallback(x: Tensor) -> bool:
    """Whether torch would run a 1x1 convolution of `x` without oneDNN: one thread and a batch under 16 (its rule).
    Its fallback copies NHWC input to NCHW and back: R50 inference at 640 on one thread took 1.03x the time of the
    GEMM form. With oneDNN, inference is as fast as the GEMM form (2 threads: 406 vs 415 ms)."""
    return torch.get_num_threads() == 1 and x.shape[0] < 16


def _eager() -> bool:
    """Not inside torch.compile, torch.export or a trace: those get the plain convolution."""
    return not torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not torch.jit.is_tracing()


def _gemm_input(x: Tensor) -> bool:
    """A channels_last fp32 `(B, C, H, W)` on the CPU outside autocast, with gradients enabled (training) or where
    torch would not use oneDNN. Only the CPU: that is where the GEMM form was measured faster; on a GPU the
    convolution library's kernels (and their TF32 setting) stay in charge."""
    return (
        x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type) and (torch.is_grad_enabled() or _im2col_fallback(x))
    )


def gemm_path(x: Tensor) -> bool:
    """Whether 1x1 convolutions of `x` run as GEMMs over its pixels here (`conv2d` below, `bottleneck.py`)."""
    return _eager() and _gemm_input(x)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _Pair = 1, padding: _Pair = 0,
           dilation: _Pair = 1, groups: int = 1) -> Tensor:
    """`F.conv2d`; for a 1x1, stride-1, ungrouped fp32 kernel and an `x` that `gemm_path` takes, computed as GEMMs
    over the pixels (`_PointwiseConvNHWC`), the output channels_last. Traced and exported graphs keep the
    convolution."""
    if (
        _eager()  # first, so that traced graphs see no test of the input's shape
        and weight.shape[-2:] == (1, 1) and groups == 1 and _all_equal(stride, 1) and _all_equal(dilation, 1)
        and _all_equal(padding, 0) and weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
        and _gemm_input(x)
    ):
        return _PointwiseConvNHWC.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters) computed by `conv2d` above; zero padding only."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
