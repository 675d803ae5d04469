"""Multi-scale deformable attention: equal to HF's pure-PyTorch `DeformableDetrMultiscaleDeformableAttention`."""
import pytest
import torch

from dab_detr.modeling import ms_deform_attn as msda
from dab_detr.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_sample

D, HEADS, LEVELS, POINTS = 32, 4, 4, 3
SHAPES = [(9, 11), (5, 6), (3, 3), (2, 1)]  # four levels of different sizes, odd and degenerate ones included
METHODS = ["grid_sample", "gather"]


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


def _hf_call(hf, query, value, ref, padding):
    shapes_t = torch.tensor(SHAPES)
    starts = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
    return hf(
        query, attention_mask=~padding, encoder_hidden_states=value, reference_points=ref,
        spatial_shapes=shapes_t, spatial_shapes_list=SHAPES, level_start_index=starts,
    )[0]


def _module_pair(dtype):
    torch.manual_seed(0)
    ours = MSDeformAttn(D, LEVELS, HEADS, POINTS)
    with torch.no_grad():  # move away from the zero init so offsets and weights matter (and points leave [0, 1])
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf = _hf_attention(ours)
    return ours.to(dtype), hf.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_equals_hf_outputs_and_gradients(dtype, tol, ref_dim):
    ours, hf = _module_pair(dtype)
    query, value, ref, padding = _inputs(dtype, ref_dim)
    q1, v1, r1 = (t.clone().requires_grad_() for t in (query, value, ref))
    q2, v2, r2 = (t.clone().requires_grad_() for t in (query, value, ref))

    out = ours(q1, r1, v1, SHAPES, padding)
    expected = _hf_call(hf, q2, v2, r2, padding)
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in ((q1, q2), (v1, v2), (r1, r2)):
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=tol)
    for (name, p), (_, p_hf) in zip(ours.named_parameters(), hf.named_parameters()):
        torch.testing.assert_close(p.grad, p_hf.grad, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("method", METHODS + ["auto"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_equals_hf_outputs_without_gradients(method, dtype, tol, ref_dim):
    """Inference (no gradient): "auto" takes the gather path there."""
    ours, hf = _module_pair(dtype)
    ours.sampling = method
    query, value, ref, padding = _inputs(dtype, ref_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(query, ref, value, SHAPES, padding), _hf_call(hf, query, value, ref, padding),
                                   atol=tol, rtol=tol)


def _locations_outside_and_on_borders(dtype, batch=2, num_queries=5):
    """(B, Q, H, L, P, 2) locations in [-0.3, 1.3] (beyond the map reads zeros), with some set exactly on the map's
    edges (0, 1) and on pixel edges and centres of their level."""
    g = torch.Generator().manual_seed(3)
    loc = torch.rand(batch, num_queries, HEADS, LEVELS, POINTS, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    for level, (h, w) in enumerate(SHAPES):
        size = torch.tensor([w, h], dtype=dtype)
        loc[0, 0, :, level, :, 0] = 0.0  # x on the left edge, y random
        loc[0, 2, :, level, :, 1] = 1.0  # y on the bottom edge, x random
        loc[0, 1, 0, level, 0] = torch.tensor([0.0, 0.0], dtype=dtype)
        loc[0, 1, 1, level, 0] = torch.tensor([1.0, 1.0], dtype=dtype)
        loc[0, 1, 2, level, 0] = torch.tensor([1.0, 0.0], dtype=dtype)
        loc[1, 0, :, level, :] = (torch.tensor([1.0, 1.0], dtype=dtype) / size)  # a pixel's corner
        loc[1, 1, :, level, :] = (torch.tensor([0.5, 0.5], dtype=dtype) / size)  # the first pixel's centre
        loc[1, 2, :, level, :] = (size - 0.5) / size  # the last pixel's centre
        loc[1, 3, :, level, :] = -0.5 / size  # half a pixel outside: the corner pixel at a quarter weight
    return loc


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_sampling_equals_hf_outside_and_on_borders(method, dtype, tol):
    pytest.importorskip("transformers")
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    g = torch.Generator().manual_seed(4)
    loc = _locations_outside_and_on_borders(dtype)
    value = torch.randn(loc.shape[0], sum(h * w for h, w in SHAPES), HEADS, 8, generator=g, dtype=dtype)
    weights = torch.rand(loc.shape[:-1], generator=g, dtype=dtype)
    shapes_t = torch.tensor(SHAPES)
    starts = torch.cat((shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]))
    expected = MultiScaleDeformableAttention()(value, shapes_t, SHAPES, starts, loc, weights, 64)
    torch.testing.assert_close(ms_deform_attn_sample(value, SHAPES, loc, weights, method), expected,
                               atol=tol, rtol=tol)


def test_auto_gathers_only_without_gradients(monkeypatch):
    called = []
    for name in ("_sample_grid", "_sample_gather"):
        real = getattr(msda, name)
        monkeypatch.setattr(msda, name, lambda *args, _name=name, _real=real: called.append(_name) or _real(*args))
    attn = MSDeformAttn(D, LEVELS, HEADS, POINTS)
    query, value, ref, padding = _inputs(torch.float32, 4)
    with torch.no_grad():
        attn(query, ref, value, SHAPES, padding)
    attn(query, ref, value, SHAPES, padding)  # the parameters need gradients
    attn.requires_grad_(False)
    attn(query, ref, value, SHAPES, padding)  # nothing needs them
    attn(query, ref.requires_grad_(), value, SHAPES, padding)  # an input does
    assert called == ["_sample_gather", "_sample_grid", "_sample_gather", "_sample_grid"]


@pytest.mark.parametrize("method", METHODS)
def test_padding_values_do_not_contribute(method):
    torch.manual_seed(0)
    attn = MSDeformAttn(D, LEVELS, HEADS, POINTS, sampling=method)
    query, value, ref, padding = _inputs(torch.float32, 4)
    junk = value.masked_fill(~padding[..., None], 0.0) * 1e3
    out = attn(query, ref, value, SHAPES, padding)
    out_junk = attn(query, ref, value + junk, SHAPES, padding)
    torch.testing.assert_close(out, out_junk)
    assert not torch.allclose(attn(query, ref, value + junk, SHAPES), out)  # without the mask, junk is seen


@pytest.mark.parametrize("method", METHODS)
def test_sampling_reads_the_value_at_a_pixel_centre(method):
    """A single level, one head, one point at the centre of pixel (x=2, y=1) reads exactly that value."""
    h, w, dh = 3, 4, 2
    value = torch.randn(1, h * w, 1, dh)
    loc = torch.tensor([(2 + 0.5) / w, (1 + 0.5) / h]).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_attn_sample(value, [(h, w)], loc, torch.ones(1, 1, 1, 1, 1), method)
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


def test_unknown_sampling_method_is_a_one_line_error():
    with pytest.raises(ValueError, match="sampling"):
        MSDeformAttn(16, sampling="bilinear")
    with pytest.raises(ValueError, match="method"):
        ms_deform_attn_sample(torch.zeros(1, 1, 1, 1), [(1, 1)], torch.zeros(1, 1, 1, 1, 1, 2),
                              torch.zeros(1, 1, 1, 1, 1), "bilinear")
