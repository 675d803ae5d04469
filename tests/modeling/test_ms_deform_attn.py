"""Multi-scale deformable attention: equal to HF's pure-PyTorch `DeformableDetrMultiscaleDeformableAttention`."""
import pytest
import torch

from dab_detr.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_sample

D, HEADS, LEVELS, POINTS = 32, 4, 4, 3
SHAPES = [(9, 11), (5, 6), (3, 3), (2, 1)]  # four levels of different sizes, odd and degenerate ones included


def _hf_attention(ours: MSDeformAttn):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    config = transformers.DeformableDetrConfig(d_model=D, num_feature_levels=LEVELS, disable_custom_kernels=True)
    hf = DeformableDetrMultiscaleDeformableAttention(config, num_heads=HEADS, n_points=POINTS)
    hf.load_state_dict(ours.state_dict())  # same parameter names
    return hf


def _inputs(dtype, ref_dim, batch=2, num_queries=7):
    g = torch.Generator().manual_seed(ref_dim)
    seq = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, num_queries, D, generator=g, dtype=dtype)
    value = torch.randn(batch, seq, D, generator=g, dtype=dtype)
    if ref_dim == 2:
        ref = torch.rand(batch, num_queries, LEVELS, 2, generator=g, dtype=dtype)
    else:
        ref = torch.cat(
            (torch.rand(batch, num_queries, LEVELS, 2, generator=g, dtype=dtype) * 0.8 + 0.1,
             torch.rand(batch, num_queries, LEVELS, 2, generator=g, dtype=dtype) * 0.5 + 0.05), -1
        )
    # image 1 is padded: the right/bottom part of every level is padding
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    start = 0
    for h, w in SHAPES:
        cells = torch.zeros(h, w, dtype=torch.bool)
        cells[(h + 1) // 2 + (h == 1):, :] = True
        cells[:, (w + 1) // 2 + (w == 1):] = True
        padding[1, start : start + h * w] = cells.flatten()
        start += h * w
    return query, value, ref, padding


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_equals_hf_outputs_and_gradients(dtype, tol, ref_dim):
    torch.manual_seed(0)
    ours = MSDeformAttn(D, LEVELS, HEADS, POINTS)
    with torch.no_grad():  # move away from the zero init so offsets and weights matter
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf = _hf_attention(ours)
    ours, hf = ours.to(dtype), hf.to(dtype)
    query, value, ref, padding = _inputs(dtype, ref_dim)
    q1, v1, r1 = (t.clone().requires_grad_() for t in (query, value, ref))
    q2, v2, r2 = (t.clone().requires_grad_() for t in (query, value, ref))

    out = ours(q1, r1, v1, SHAPES, padding)
    shapes_t = torch.tensor(SHAPES)
    starts = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
    expected, _ = hf(
        q2, attention_mask=~padding, encoder_hidden_states=v2, reference_points=r2,
        spatial_shapes=shapes_t, spatial_shapes_list=SHAPES, level_start_index=starts,
    )
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in ((q1, q2), (v1, v2), (r1, r2)):
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=tol)
    for (name, p), (_, p_hf) in zip(ours.named_parameters(), hf.named_parameters()):
        torch.testing.assert_close(p.grad, p_hf.grad, atol=tol, rtol=tol, msg=name)


def test_padding_values_do_not_contribute():
    torch.manual_seed(0)
    attn = MSDeformAttn(D, LEVELS, HEADS, POINTS)
    query, value, ref, padding = _inputs(torch.float32, 4)
    junk = value.masked_fill(~padding[..., None], 0.0) * 1e3
    out = attn(query, ref, value, SHAPES, padding)
    out_junk = attn(query, ref, value + junk, SHAPES, padding)
    torch.testing.assert_close(out, out_junk)
    assert not torch.allclose(attn(query, ref, value + junk, SHAPES), out)  # without the mask, junk is seen


def test_sampling_reads_the_value_at_a_pixel_centre():
    """A single level, one head, one point at the centre of pixel (x=2, y=1) reads exactly that value."""
    h, w, dh = 3, 4, 2
    value = torch.randn(1, h * w, 1, dh)
    loc = torch.tensor([(2 + 0.5) / w, (1 + 0.5) / h]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_sample(value, [(h, w)], loc, torch.ones(1, 1, 1, 1, 1))
    torch.testing.assert_close(out[0, 0], value[0, 1 * w + 2, 0])


def test_init_matches_deformable_detr():
    attn = MSDeformAttn(16, 2, 8, 3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[2, 1, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)  # 90 degrees, point 2
    assert bias.abs().amax(-1).eq(torch.tensor([1.0, 2.0, 3.0])).all()  # on the unit square's border, scaled
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0


@pytest.mark.parametrize("arg", ["n_points", "n_levels", "n_heads"])
def test_bad_sizes_are_one_line_errors(arg):
    with pytest.raises(ValueError, match=arg):
        MSDeformAttn(16, **{arg: 0})
