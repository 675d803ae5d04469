import torch

from dab_detr.modeling.attention import (
    MultiheadAttention,
    PreProjectedAttention,
    key_padding_to_attn_mask,
    multi_head_attention,
)


def _explicit_attention(q, k, v, num_heads, key_padding_mask=None):
    """Per-head softmax(q k^T / sqrt(d_qk)) v with a loop over heads, as a reference."""
    outs = []
    dq, dv = q.shape[-1] // num_heads, v.shape[-1] // num_heads
    for h in range(num_heads):
        qh, kh, vh = q[..., h * dq : (h + 1) * dq], k[..., h * dq : (h + 1) * dq], v[..., h * dv : (h + 1) * dv]
        scores = qh @ kh.transpose(-1, -2) / dq**0.5
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        outs.append(scores.softmax(-1) @ vh)
    return torch.cat(outs, dim=-1)


def test_attention_with_wider_query_key_heads_than_value_heads():
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 8)
    torch.testing.assert_close(multi_head_attention(q, k, v, num_heads=4), _explicit_attention(q, k, v, 4))


def test_padded_keys_are_ignored():
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 8)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    out = multi_head_attention(q, k, v, 4, key_padding_to_attn_mask(padding))
    torch.testing.assert_close(out, _explicit_attention(q, k, v, 4, padding))
    k2, v2 = k.clone(), v.clone()
    k2[1, 4:], v2[1, 4:] = 1e3, -1e3  # whatever sits in the padding does not matter
    torch.testing.assert_close(multi_head_attention(q, k2, v2, 4, key_padding_to_attn_mask(padding)), out)


def test_multihead_attention_matches_torch_with_the_same_weights():
    ours = MultiheadAttention(16, 4).eval()
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    x, pos, mem = torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 3:] = True
    mask = key_padding_to_attn_mask(padding)
    q = x + pos  # the fused q/k path (query is key) and the separate path must agree with torch
    torch.testing.assert_close(ours(q, q, x, mask), ref(q, q, x, key_padding_mask=padding)[0])
    torch.testing.assert_close(ours(x, mem, mem, mask), ref(x, mem, mem, key_padding_mask=padding)[0])


def test_pre_projected_attention_applies_only_the_output_projection():
    attn = PreProjectedAttention(8, 2)
    assert [n for n, _ in attn.named_parameters()] == ["out_proj.weight", "out_proj.bias"]
    q, k, v = torch.randn(1, 3, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 8)
    torch.testing.assert_close(attn(q, k, v), attn.out_proj(_explicit_attention(q, k, v, 2)))
