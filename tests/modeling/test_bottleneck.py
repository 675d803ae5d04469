"""`modeling.bottleneck`: one autograd node equal to ResNet's bottleneck block of plain ops, in value and in every
gradient, for the identity shortcut and 1x1 projections of stride 1 and 2; a chain of blocks as one node equal to
the blocks one after the other."""
import pytest
import torch
import torch.nn.functional as F

from dab_detr.modeling.bottleneck import Block, bottleneck, bottleneck_chain


def reference_block(x, conv1, conv2, conv3, shortcut, stride, dilation, groups):
    out = F.relu(F.conv2d(x, *conv1))
    out = F.relu(F.conv2d(out, *conv2, stride=stride, padding=dilation, dilation=dilation, groups=groups))
    out = F.conv2d(out, *conv3)
    return F.relu(out + (x if shortcut is None else F.conv2d(x, *shortcut, stride=stride)))


def make_block(g, c_in, c_mid, c_out, projection, groups, dtype):
    def conv(k, c, size):
        weight = torch.randn(k, c, size, size, generator=g, dtype=dtype) / (c * size * size) ** 0.5
        return [weight.contiguous(memory_format=torch.channels_last).requires_grad_(),
                (0.1 * torch.randn(k, generator=g, dtype=dtype)).requires_grad_()]

    return (conv(c_mid, c_in, 1), conv(c_mid, c_mid // groups, 3), conv(c_out, c_mid, 1),
            conv(c_out, c_in, 1) if projection else None)


@pytest.mark.parametrize("c_in, projection, stride, dilation, groups", [
    (16, False, 1, 1, 1),   # identity shortcut
    (8, True, 1, 1, 1),     # first block of res2: projection, stride 1
    (8, True, 2, 1, 1),     # first block of res3-res5: strided 3x3 and projection
    (16, False, 1, 2, 2),   # dilated, grouped 3x3 (ResNeXt, dilated res5)
])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_bottleneck_equals_the_block_of_plain_ops(c_in, projection, stride, dilation, groups, x_needs_grad):
    g = torch.Generator().manual_seed(0)
    dtype = torch.float64  # the comparison is of the math, not of float rounding
    convs = make_block(g, c_in, 6, 16, projection, groups, dtype)
    x = torch.randn(2, c_in, 7, 6, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(x_needs_grad)
    leaves = ([x] if x_needs_grad else []) + [t for conv in convs if conv is not None for t in conv]

    got = bottleneck(x, *convs, stride=stride, dilation=dilation, groups=groups)
    grad_out = torch.randn(got.shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    expected = reference_block(x, *convs, stride, dilation, groups)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected)
    assert (got == 0).any()  # some ReLU masks are active: the masked gradients are tested
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_bottleneck_keeps_the_incoming_gradient_and_its_saved_tensors_intact():
    """The in-place steps of the backward act on buffers of the block's own, never on autograd's gradient."""
    g = torch.Generator().manual_seed(1)
    convs = make_block(g, 16, 6, 16, False, 1, torch.float32)
    x = torch.randn(2, 16, 5, 5, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = bottleneck(x, *convs)
    grad_out = torch.randn(out.shape, generator=g).contiguous(memory_format=torch.channels_last)
    kept = grad_out.clone()
    first = torch.autograd.grad(out, [x], grad_out, retain_graph=True)[0]
    assert torch.equal(grad_out, kept)
    torch.testing.assert_close(torch.autograd.grad(out, [x], grad_out)[0], first, rtol=0, atol=0)


def test_bottleneck_takes_a_broadcast_or_nchw_incoming_gradient():
    """`out.sum()` sends an expanded scalar back, other consumers an NCHW gradient: the block reads either."""
    g = torch.Generator().manual_seed(2)
    convs = make_block(g, 8, 6, 16, True, 1, torch.float64)
    x = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    leaves = [x] + [t for conv in convs for t in conv]
    for make_loss in (lambda out: out.sum(), lambda out: (out.contiguous() * torch.arange(16.0, dtype=out.dtype)
                                                          .view(1, -1, 1, 1)).sum()):
        got = torch.autograd.grad(make_loss(bottleneck(x, *convs, stride=2)), leaves)
        expected = torch.autograd.grad(make_loss(reference_block(x, *convs, 2, 1, 1)), leaves)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("frozen_first, x_needs_grad", [(False, True), (False, False), (True, False)])
def test_a_chain_of_blocks_equals_the_blocks_of_plain_ops(frozen_first, x_needs_grad):
    """A stage (strided projection block, two identity blocks) as one node: the same output and gradients, and the
    incoming gradient left as it was. With the first block frozen and `x` constant, nothing flows past block 1."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float64
    specs = [(8, True, 2), (16, False, 1), (16, False, 1)]  # (c_in, projection, stride)
    blocks = [Block(*make_block(g, c_in, 6, 16, projection, 1, dtype), stride=stride)
              for c_in, projection, stride in specs]
    if frozen_first:
        for t in (t for conv in blocks[0][:4] for t in conv):
            t.requires_grad_(False)
    x = torch.randn(2, 8, 9, 8, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(x_needs_grad)
    leaves = ([x] if x_needs_grad else []) + [
        t for block in blocks for conv in block[:4] if conv is not None for t in conv if t.requires_grad]

    got = bottleneck_chain(x, blocks)
    grad_out = torch.randn(got.shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    kept = grad_out.clone()
    got_grads = torch.autograd.grad(got, leaves, grad_out, retain_graph=True)
    expected = x
    for block in blocks:
        expected = reference_block(expected, *block[:4], block.stride, block.dilation, block.groups)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    torch.testing.assert_close(got, expected)
    assert all((out == 0).any() for out in (got, expected))
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)
    assert torch.equal(grad_out, kept)
    again = torch.autograd.grad(got, leaves, grad_out)  # the saved tensors were not written to either
    for a, b in zip(again, got_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_chain_without_gradients_records_nothing():
    g = torch.Generator().manual_seed(4)
    blocks = [Block(*make_block(g, 16, 6, 16, False, 1, torch.float32)) for _ in range(2)]
    x = torch.randn(1, 16, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = bottleneck_chain(x, blocks)
        expected = bottleneck(bottleneck(x, *blocks[0][:4]), *blocks[1][:4])
    assert out.grad_fn is None
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
