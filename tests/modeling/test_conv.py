"""`modeling.conv.conv2d`: a 1x1 convolution of NHWC activations as a GEMM is F.conv2d, in value and gradient."""
import pytest
import torch
import torch.nn.functional as F

from dab_detr.modeling import conv as conv_module
from dab_detr.modeling.conv import Conv2d, conv2d


@pytest.mark.parametrize("with_bias", [True, False])
def test_pointwise_conv_of_channels_last_input_is_a_gemm_equal_to_conv2d(monkeypatch, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 3, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(4, 6, 1, 1, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(4, generator=g).requires_grad_() if with_bias else None
    grad = torch.randn(2, 4, 5, 3, generator=g)
    gemm_calls = []
    apply = conv_module._PointwiseConvNHWC.apply
    monkeypatch.setattr(conv_module._PointwiseConvNHWC, "apply", lambda *a: gemm_calls.append(1) or apply(*a))

    got = conv2d(x, weight, bias)
    got.backward(grad)
    got_grads = [t.grad.clone() for t in (x, weight, bias) if t is not None]
    for t in (x, weight, bias):
        if t is not None:
            t.grad = None
    expected = F.conv2d(x, weight, bias)
    expected.backward(grad)

    assert gemm_calls == [1]
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    for a, t in zip(got_grads, [t for t in (x, weight, bias) if t is not None]):
        torch.testing.assert_close(a, t.grad)


@pytest.mark.parametrize("kwargs, memory_format", [
    ({"kernel_size": 1}, torch.contiguous_format),  # NCHW input: the convolution itself
    ({"kernel_size": 1, "stride": 2}, torch.channels_last),
    ({"kernel_size": 3, "padding": 1}, torch.channels_last),
])
def test_other_convolutions_stay_conv2d(monkeypatch, kwargs, memory_format):
    torch.manual_seed(0)
    module = Conv2d(6, 4, **kwargs)
    x = torch.randn(2, 6, 6, 6).contiguous(memory_format=memory_format)
    monkeypatch.setattr(conv_module._PointwiseConvNHWC, "apply", lambda *a: pytest.fail("took the GEMM path"))
    assert torch.equal(module(x), F.conv2d(x, module.weight, module.bias, module.stride, module.padding))


@pytest.mark.parametrize("threads, batch, gemm", [(2, 2, False), (1, 16, False), (1, 2, True)])
def test_inference_takes_the_gemm_only_where_torch_would_not_use_onednn(monkeypatch, threads, batch, gemm):
    """Without gradients oneDNN's convolution is as fast; torch skips it for one thread and batches under 16."""
    module = Conv2d(6, 4, kernel_size=1)
    x = torch.randn(batch, 6, 6, 6).contiguous(memory_format=torch.channels_last)
    calls = []
    apply = conv_module._PointwiseConvNHWC.apply
    monkeypatch.setattr(conv_module._PointwiseConvNHWC, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(conv_module.torch, "get_num_threads", lambda: threads)
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.conv2d(x, module.weight, module.bias))
    assert calls == ([1] if gemm else [])


def test_pointwise_conv_output_takes_in_place_ops_like_a_convolution_output():
    """ResNet blocks add the shortcut and apply ReLU in place on a 1x1 convolution's output."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, 4, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(4, 6, 1, 1, generator=g).requires_grad_()
    shortcut = torch.randn(2, 4, 4, 4, generator=g)
    grads = []
    for fn in (conv2d, F.conv2d):
        out = fn(x, weight)
        out += shortcut
        out = F.relu_(out)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad, weight.grad))
        x.grad = weight.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_the_gemm_path_is_for_cpu_tensors_only():
    """Measured on the CPU; elsewhere the convolution library keeps the work (no GPU here: the meta device)."""
    from dab_detr.modeling.conv import gemm_path

    assert gemm_path(torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last))
    assert not gemm_path(torch.empty(2, 6, 4, 4, device="meta").contiguous(memory_format=torch.channels_last))
