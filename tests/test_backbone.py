import copy

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BottleneckBlock
from detectron2.structures import ImageList

from dab_detr import backbone as backbone_module
from dab_detr.backbone import (
    FrozenBNConv2d, fold_frozen_batchnorm, fuse_bottleneck_blocks, small_resnet_stages, use_nhwc_convolutions,
)
from dab_detr.modeling import conv as conv_module
from dab_detr.meta_arch import DABDETR
from dab_detr.modeling.dab_detr_head import DabDetrHead

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _randomise_frozen_bn(module, seed=0):
    """Non-identity statistics: with the defaults (mean 0, var 1, affine 1/0) a dropped norm would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return module


def _r18(norm="FrozenBN", freeze_at=1):
    torch.manual_seed(0)
    return ResNet(BasicStem(in_channels=3, out_channels=64, norm=norm),
                  ResNet.make_default_stages(depth=18, norm=norm), out_features=["res5"], freeze_at=freeze_at)


def test_folding_keeps_the_state_dict_and_the_outputs():
    reference = _randomise_frozen_bn(_r18())
    folded = copy.deepcopy(reference)
    state = reference.state_dict()
    # every conv of an R18 has a FrozenBN: stem 1, 8 blocks x 2, 3 shortcuts
    assert fold_frozen_batchnorm(folded) == 20
    assert list(folded.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in folded.state_dict().items())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(folded(x)["res5"], reference(x)["res5"], rtol=1e-5, atol=1e-5)


def test_folded_convolutions_train_like_conv_then_frozen_bn():
    reference = _randomise_frozen_bn(_r18(freeze_at=0))
    folded = copy.deepcopy(reference)
    fold_frozen_batchnorm(folded)
    x = torch.randn(2, 3, 64, 64)
    for model in (reference, folded):
        model(x)["res5"].square().mean().backward()
    for (name, p), q in zip(reference.named_parameters(), folded.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(b.grad is None for b in folded.buffers())  # the BN statistics stay frozen


def test_only_convolutions_with_frozen_bn_are_folded():
    trainable_bn = ResNet(BasicStem(in_channels=3, out_channels=8, norm="BN"),
                          small_resnet_stages(widths=(8, 16, 32, 32), stem_width=8), out_features=["res5"], freeze_at=0)
    assert fold_frozen_batchnorm(trainable_bn) == 0
    assert not any(isinstance(m, FrozenBNConv2d) for m in trainable_bn.modules())


def test_a_norm_replaced_after_folding_is_applied_as_is():
    conv = Conv2d(3, 4, kernel_size=1, bias=False, norm=FrozenBatchNorm2d(4))
    fold_frozen_batchnorm(conv)
    assert isinstance(conv, FrozenBNConv2d)
    conv.norm = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        conv.norm.running_mean.fill_(3.0)
        x = torch.randn(1, 3, 5, 5)
        torch.testing.assert_close(conv(x), conv.norm(torch.nn.functional.conv2d(x, conv.weight)))


def test_channels_last_backbone_gives_the_same_raw_outputs():
    backbone = _randomise_frozen_bn(_r18())
    head = DabDetrHead(num_classes=3, hidden_dim=32, num_queries=8, nheads=4, num_encoder_layers=1,
                       num_decoder_layers=2, dim_feedforward=64)
    model = DABDETR(backbone=backbone, head=head, criterion=None, num_classes=3, pixel_mean=MEAN,
                    pixel_std=STD).eval()
    assert model.channels_last  # the default
    # the weights are NHWC too (NCHW weights made oneDNN re-lay them out on every call)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    images = ImageList(torch.randn(2, 3, 96, 128), [(96, 128), (64, 96)])
    with torch.no_grad():
        fast = model.forward_raw(images)
        model.channels_last = False
        plain = model.forward_raw(images)
    torch.testing.assert_close(fast["pred_logits"], plain["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast["pred_boxes"], plain["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_small_resnet_with_three_stages_ends_at_res4_stride_16():
    backbone = ResNet(BasicStem(in_channels=3, out_channels=8, norm="BN"),
                      small_resnet_stages(depths=[1, 1, 1], widths=[8, 16, 32], stem_width=8, strides=[1, 2, 2]),
                      out_features=["res4"], freeze_at=0)
    assert backbone.output_shape()["res4"].stride == 16 and "res5" not in backbone.output_shape()
    assert backbone(torch.randn(1, 3, 64, 64))["res4"].shape == (1, 32, 4, 4)


@pytest.mark.parametrize("depths, widths, strides", [
    ([1, 1], [8, 16, 32], [1, 2, 2]),  # lengths differ
    ([], [], []),
    ([1] * 5, [8, 16, 32, 64, 128], [1, 2, 2, 2, 2]),  # no res6
])
def test_small_resnet_stages_rejects_lists_of_the_wrong_length(depths, widths, strides):
    with pytest.raises(ValueError, match="depths, widths and strides need the same number of entries, 1 to 4"):
        small_resnet_stages(depths=depths, widths=widths, strides=strides, stem_width=8)


def _r50_stages(stride_in_1x1=False, width=8, dilation=1):
    """ResNet-50 (3, 4, 6, 3 bottleneck blocks, FrozenBN) 1/8 as wide; `dilation` 2: res5 dilated, stride 1."""
    torch.manual_seed(0)
    stages, in_channels = [], width
    for i, depth in enumerate((3, 4, 6, 3)):
        mid = width * 2 ** i
        last = i == 3
        stride = 1 if i == 0 or (last and dilation > 1) else 2
        stages.append(ResNet.make_stage(
            BottleneckBlock, depth, in_channels=in_channels, out_channels=4 * mid, bottleneck_channels=mid,
            stride_per_block=[stride] + [1] * (depth - 1), norm="FrozenBN", stride_in_1x1=stride_in_1x1,
            dilation=dilation if last else 1,
        ))
        in_channels = 4 * mid
    return ResNet(BasicStem(in_channels=3, out_channels=width, norm="FrozenBN"), stages, out_features=["res5"],
                  freeze_at=1)


def _fast_backbone(reference):
    fast = copy.deepcopy(reference)
    fold_frozen_batchnorm(fast)
    use_nhwc_convolutions(fast)
    assert fuse_bottleneck_blocks(fast) == 16
    return fast.to(memory_format=torch.channels_last)


def _assert_close_to_scale(got, expected, rel, msg=""):
    """Equal up to `rel` of the reference's largest magnitude: random FrozenBN statistics make activations and
    gradients grow through 16 blocks, and float sums in another order differ by a share of that."""
    err = (got - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"{msg}: max abs difference {err:.3g}"


@pytest.mark.parametrize("dilation", [1, 2])
def test_fused_bottleneck_blocks_train_like_detectron2s(monkeypatch, dilation):
    """A FrozenBN R50 (narrow) with every speed-up of DABDETR: the same features and parameter gradients as
    detectron2's own blocks, and every stage ran as one fused node."""
    reference = _randomise_frozen_bn(_r50_stages(dilation=dilation))
    fast = _fast_backbone(reference)
    calls = _count_chains(monkeypatch)
    x = torch.randn(2, 3, 64, 96)
    outputs = []
    for model in (reference, fast):
        features = model(x.contiguous(memory_format=torch.channels_last) if model is fast else x)["res5"]
        features.backward(torch.randn(features.shape, generator=torch.Generator().manual_seed(1)))
        outputs.append(features.detach())
    assert calls == [3, 4, 6, 3]  # one node per stage
    _assert_close_to_scale(outputs[1], outputs[0], 1e-5, "features")
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            _assert_close_to_scale(q.grad, p.grad, 1e-5, name)


def _count_chains(monkeypatch):
    """The number of blocks of each `bottleneck_chain` call the backbone makes, in call order."""
    calls = []
    fused = backbone_module.bottleneck_chain
    monkeypatch.setattr(backbone_module, "bottleneck_chain",
                        lambda x, blocks: calls.append(len(blocks)) or fused(x, blocks))
    return calls


@pytest.mark.parametrize("case, chains", [
    ("no_grad_two_threads", []),  # inference with oneDNN: detectron2's forward (as fast there)
    ("no_grad_one_thread", [3, 4, 6, 3]),  # inference where torch skips oneDNN: the fused stages, forward only
    ("autocast", []),
    ("stride_in_1x1", [3, 3, 5, 2]),  # res3-res5 start with a strided 1x1: those three blocks fall back
])
def test_fused_bottleneck_blocks_where_they_apply(monkeypatch, case, chains):
    reference = _randomise_frozen_bn(_r50_stages(stride_in_1x1=case == "stride_in_1x1"))
    fast = _fast_backbone(reference)
    calls = _count_chains(monkeypatch)
    monkeypatch.setattr(conv_module.torch, "get_num_threads", lambda: 1 if case == "no_grad_one_thread" else 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)["res5"]
    with torch.set_grad_enabled(not case.startswith("no_grad")), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = fast(x.contiguous(memory_format=torch.channels_last))["res5"].detach()
    assert calls == chains
    _assert_close_to_scale(got.float(), expected, 2e-2 if case == "autocast" else 1e-5, case)


def test_a_block_with_hooks_is_called_as_a_module_and_the_rest_of_its_stage_still_fuses(monkeypatch):
    """A forward hook on one block (feature visualisation, Grad-CAM) runs, with the same features and gradients;
    the blocks before and after it in its stage run as chains."""
    reference = _randomise_frozen_bn(_r50_stages())
    fast = _fast_backbone(reference)
    seen = []
    fast.res4[2].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    calls = _count_chains(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    grad = torch.randn(1, 256, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = reference(x)["res5"]
    expected.backward(grad)
    got = fast(x.contiguous(memory_format=torch.channels_last))["res5"]
    got.backward(grad)
    assert seen == [(1, 128, 4, 4)]
    assert calls == [3, 4, 2, 1, 3, 3]  # res4: blocks 0-1, the hooked block 2 as a chain of one, blocks 3-5
    _assert_close_to_scale(got.detach(), expected.detach(), 1e-5, "features")
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        if p.grad is not None:
            _assert_close_to_scale(q.grad, p.grad, 1e-5, name)
