"""Backbone helpers: small detectron2 ResNets for training from scratch (the embedded dataset, tests), and, for
speed, folding FrozenBN into the convolution before it, running 1x1 convolutions of NHWC activations as GEMMs and
bottleneck blocks as one autograd node."""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from torch import Tensor, nn

from .modeling.bottleneck import Block, bottleneck_chain
from .modeling.conv import conv2d, gemm_path


def small_resnet_stages(
    depths: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (32, 64, 128, 256),
    stem_width: int = 32,
    strides: Sequence[int] = (1, 2, 2, 1),
    norm: str = "BN",
) -> List[list]:
    """Stages res2..res(N+1) of a basic-block ResNet (N = 1-4 entries per list), for
    `ResNet(stem=BasicStem(out_channels=stem_width), stages=...)`.

    With strides (1, 2, 2) the last stage, res4, is at stride 16, so small images still give the encoder enough
    tokens (128 px -> 8x8); a stride-1 res5 after it would stay at stride 16 too. Trainable BN (`norm="BN"`)
    because FrozenBN is an identity when nothing was pretrained.
    """
    if not (1 <= len(depths) <= 4 and len(depths) == len(widths) == len(strides)):
        raise ValueError(
            f"small_resnet_stages: depths, widths and strides need the same number of entries, 1 to 4 "
            f"(res2..res5), got {list(depths)}, {list(widths)}, {list(strides)}"
        )
    stages, in_channels = [], stem_width
    for name, depth, width, stride in zip(("res2", "res3", "res4", "res5"), depths, widths, strides):
        if stride != 1 and width == in_channels:
            # detectron2's BasicBlock only has a projection shortcut when the width changes
            raise ValueError(f"small_resnet_stages: {name} has stride {stride} but keeps width {width}; widen it")
        stages.append(
            ResNet.make_stage(
                BasicBlock, depth, in_channels=in_channels, out_channels=width,
                stride_per_block=[stride] + [1] * (depth - 1), norm=norm,
            )
        )
        in_channels = width
    return stages


class NHWCConv2d(Conv2d):
    """detectron2 `Conv2d` (same parameters, norm, activation) whose convolution is `modeling.conv.conv2d`: a 1x1,
    stride-1 one on channels_last activations runs as one GEMM over the pixels."""

    def forward(self, x: Tensor) -> Tensor:
        x = conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


class FrozenBNConv2d(NHWCConv2d):
    """detectron2 `Conv2d` whose FrozenBN `norm` is applied through the convolution's weight and bias.

    conv(x, W) * s + t == conv(x, W * s) + t with s = gamma / sqrt(var + eps), t = beta - mean * s: one pass over
    the activations instead of two (eval) or three (training, where FrozenBN is a multiply and an add), and no
    extra activation kept for the backward. The fold happens on every call (cheap: per weight, not per pixel), so
    the parameters and buffers, and therefore the state dict, stay those of conv + FrozenBN.
    """

    def folded(self) -> Tuple[Tensor, Tensor]:
        """(weight * s, t (+ bias * s)): the weight and bias of the one convolution equal to conv + FrozenBN."""
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        bias = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            bias = bias + self.bias * scale
        return self.weight * scale.reshape(-1, 1, 1, 1).to(self.weight.dtype), bias.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.norm, FrozenBatchNorm2d):  # norm swapped after folding: plain convolution + norm
            return super().forward(x)
        weight, bias = self.folded()
        x = conv2d(x, weight, bias.to(x.dtype), self.stride, self.padding, self.dilation, self.groups)
        return self.activation(x) if self.activation is not None else x


def _recast(module: nn.Module, old: type, new: type, when: Callable[[nn.Module], bool] = lambda m: True) -> int:
    """Give every submodule of exactly class `old` (for which `when` holds) class `new`, in place; the count."""
    matches = [m for m in module.modules() if type(m) is old and when(m)]
    for m in matches:
        m.__class__ = new
    return len(matches)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Make every detectron2 `Conv2d` in `module` whose `norm` is a `FrozenBatchNorm2d` a `FrozenBNConv2d`, in place.

    Only the class changes (same parameters, buffers, state-dict keys, outputs up to float rounding).
    Returns the number of convolutions changed.
    """
    return _recast(module, Conv2d, FrozenBNConv2d, lambda m: isinstance(m.norm, FrozenBatchNorm2d))


def use_nhwc_convolutions(module: nn.Module) -> int:
    """Make every other plain detectron2 `Conv2d` in `module` an `NHWCConv2d`, in place (only the class changes).
    Returns the number of convolutions changed."""
    return _recast(module, Conv2d, NHWCConv2d)


def _folded_conv(conv: Optional[nn.Module]) -> bool:
    return (
        type(conv) is FrozenBNConv2d and isinstance(conv.norm, FrozenBatchNorm2d) and conv.activation is None
        and conv.weight.dtype == torch.float32
    )


class FrozenBNBottleneckBlock(BottleneckBlock):
    """detectron2 `BottleneckBlock` (same parameters) whose convolutions all carry a FrozenBN, run as one
    `modeling.bottleneck` node where the NHWC GEMM path applies (`conv.gemm_path`: training, or one thread):
    fewer passes over the activations, in the forward and in the backward. Otherwise (a traced or exported graph,
    autocast, NCHW input, the stride in the first 1x1 convolution, a norm swapped after folding) it runs as
    detectron2 runs it."""

    def fusable(self) -> bool:
        """Whether the block's layers fit the fused node (checked on its modules, not on the input)."""
        conv1, conv2, conv3, shortcut = self.conv1, self.conv2, self.conv3, self.shortcut
        return (
            _folded_conv(conv1) and _folded_conv(conv2) and _folded_conv(conv3)
            and (shortcut is None or (_folded_conv(shortcut) and shortcut.stride == conv2.stride))
            and conv1.stride == (1, 1) and conv2.stride[0] == conv2.stride[1]
            and conv2.padding == conv2.dilation and conv2.dilation[0] == conv2.dilation[1]
        )

    def folded(self) -> Block:
        """The block's folded weights and geometry, for `modeling.bottleneck`."""
        conv2, shortcut = self.conv2, self.shortcut
        return Block(self.conv1.folded(), conv2.folded(), self.conv3.folded(),
                     shortcut.folded() if shortcut is not None else None,
                     stride=conv2.stride[0], dilation=conv2.dilation[0], groups=conv2.groups)

    def forward(self, x: Tensor) -> Tensor:
        if not (gemm_path(x) and self.fusable()):
            return super().forward(x)
        return bottleneck_chain(x, [self.folded()])


def _runs_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks, its own or global ones (a fused stage would skip its blocks' calls)."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        or hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


class FrozenBNBottleneckStage(nn.Sequential):
    """A detectron2 ResNet stage (`nn.Sequential`, same children and keys) whose consecutive fusable
    `FrozenBNBottleneckBlock`s run as one `bottleneck_chain` node where the NHWC GEMM path applies. Between two
    blocks of a chain the backward owns the gradient, so the ReLU mask goes into it in place: a training step
    of R50 in ~0.99x the time, bit-identical gradients. A block with hooks of its own (or with global module hooks
    set) is called as a module, so that its hooks run."""

    def forward(self, x: Tensor) -> Tensor:
        run: List[FrozenBNBottleneckBlock] = []
        for block in self:
            if type(block) is FrozenBNBottleneckBlock and block.fusable() and not _runs_hooks(block):
                run.append(block)
                continue
            x, run = self._chain(x, run), []
            x = block(x)
        return self._chain(x, run)

    @staticmethod
    def _chain(x: Tensor, blocks: List[FrozenBNBottleneckBlock]) -> Tensor:
        if blocks and gemm_path(x):
            return bottleneck_chain(x, [block.folded() for block in blocks])
        for block in blocks:  # each as detectron2 runs it (`FrozenBNBottleneckBlock.forward` checks the input)
            x = block(x)
        return x


def fuse_bottleneck_blocks(module: nn.Module) -> int:
    """Make every detectron2 `BottleneckBlock` in `module` a `FrozenBNBottleneckBlock`, and every `nn.Sequential`
    of such blocks (a ResNet stage) a `FrozenBNBottleneckStage`, in place (only the classes change; a block takes
    the fused path only while all its convolutions are folded). Returns the number of blocks changed."""
    blocks = _recast(module, BottleneckBlock, FrozenBNBottleneckBlock)
    _recast(module, nn.Sequential, FrozenBNBottleneckStage,
            lambda m: len(m) > 0 and all(type(b) is FrozenBNBottleneckBlock for b in m))
    return blocks
