"""Formula and gradient-flow tests of the DAB-DETR transformer, for options the HF comparison does not reach."""
import pytest
import torch

from dab_detr.modeling.attention import key_padding_to_attn_mask
from dab_detr.modeling.box_ops import inverse_sigmoid
from dab_detr.modeling.position_encoding import anchor_sine_embed
from dab_detr.modeling.transformer import DabDetrTransformer, TransformerDecoder, TransformerEncoder

D, HEADS, LAYERS = 16, 2, 3


def _decoder(**kwargs) -> TransformerDecoder:
    torch.manual_seed(0)
    return TransformerDecoder(D, HEADS, LAYERS, dim_feedforward=32, dropout=0.0, activation="prelu", **kwargs)


def _decoder_inputs(batch=2, num_queries=5, hw=6):
    g = torch.Generator().manual_seed(1)
    tgt = torch.randn(batch, num_queries, D, generator=g)
    memory, pos = torch.randn(batch, hw, D, generator=g), torch.randn(batch, hw, D, generator=g)
    reference = torch.rand(batch, num_queries, 4, generator=g) * 0.6 + 0.2
    padding = torch.zeros(batch, hw, dtype=torch.bool)
    padding[1, 4:] = True
    return tgt, memory, pos, reference, key_padding_to_attn_mask(padding)


def _run_recording_layers(decoder, inputs):
    """Run the decoder; return (hs, references, per-layer positional args, per-layer raw outputs)."""
    layer_args, layer_outputs = [], []
    hooks = [layer.register_forward_pre_hook(lambda m, args: layer_args.append(args)) for layer in decoder.layers]
    hooks += [layer.register_forward_hook(lambda m, args, out: layer_outputs.append(out)) for layer in decoder.layers]
    try:
        hs, references = decoder(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return hs, references, layer_args, layer_outputs


@pytest.mark.parametrize("query_scale_type", ["cond_elewise", "cond_scalar", "fix_elewise"])
@pytest.mark.parametrize("modulate_hw_attn", [True, False])
def test_cross_attention_positional_query_formula(query_scale_type, modulate_hw_attn):
    decoder = _decoder(query_scale_type=query_scale_type, modulate_hw_attn=modulate_hw_attn)
    inputs = _decoder_inputs()
    with torch.no_grad():
        _, references, layer_args, layer_outputs = _run_recording_layers(decoder, inputs)
        for l in range(LAYERS):
            previous = inputs[0] if l == 0 else layer_outputs[l - 1]  # the raw (un-normed) content
            ref = references[l]
            sine = anchor_sine_embed(ref, D // 2)
            torch.testing.assert_close(layer_args[l][3], decoder.ref_point_head(sine))  # query_pos
            expected = sine[..., :D].clone()
            if query_scale_type == "fix_elewise":
                expected = expected * decoder.query_scale.weight[l]
            elif l > 0:
                scale = decoder.query_scale(previous)
                assert scale.shape[-1] == (D if query_scale_type == "cond_elewise" else 1)
                expected = expected * scale
            if modulate_hw_attn:
                ref_wh = decoder.ref_anchor_head(previous).sigmoid()
                expected[..., : D // 2] *= (ref_wh[..., 1] / ref[..., 3]).unsqueeze(-1)  # y part: h_ref / h
                expected[..., D // 2 :] *= (ref_wh[..., 0] / ref[..., 2]).unsqueeze(-1)  # x part: w_ref / w
            else:
                assert decoder.ref_anchor_head is None
            torch.testing.assert_close(layer_args[l][4], expected)


@pytest.mark.parametrize("bbox_embed_diff_each_layer", [False, True])
def test_box_refinement_reads_the_raw_layer_output_and_heads_read_the_normed_one(bbox_embed_diff_each_layer):
    decoder = _decoder(bbox_embed_diff_each_layer=bbox_embed_diff_each_layer, inverse_sigmoid_eps=1e-3)
    if bbox_embed_diff_each_layer:
        assert len(decoder.bbox_embed) == LAYERS and decoder.bbox_embed[0] is not decoder.bbox_embed[1]
    inputs = _decoder_inputs()
    with torch.no_grad():
        hs, references, _, layer_outputs = _run_recording_layers(decoder, inputs)
        torch.testing.assert_close(references[0], inputs[3])  # layer 0 reads the anchors
        for l in range(LAYERS - 1):
            mlp = decoder.bbox_embed[l] if bbox_embed_diff_each_layer else decoder.bbox_embed
            expected = (mlp(layer_outputs[l]) + inverse_sigmoid(references[l], 1e-3)).sigmoid()
            torch.testing.assert_close(references[l + 1], expected)
        torch.testing.assert_close(hs, decoder.norm(torch.stack(layer_outputs)))
    assert references.shape == (LAYERS, 2, 5, 4)


def test_next_layer_reference_is_detached_but_the_stored_reference_is_not():
    decoder = _decoder()
    _, references, layer_args, _ = _run_recording_layers(decoder, _decoder_inputs())
    box_params = list(decoder.bbox_embed.parameters())
    layer0_params = list(decoder.layers[0].parameters())
    # Layer 1's positional query comes from its reference alone: no path back to layer 0 or bbox_embed.
    grads = torch.autograd.grad(
        layer_args[1][3].sum(), box_params + layer0_params, allow_unused=True, retain_graph=True
    )
    assert all(g is None for g in grads)
    # The stored reference of layer 1 (used by layer 1's box loss) trains bbox_embed and layer 0.
    grads = torch.autograd.grad(references[1].sum(), box_params + layer0_params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads[: len(box_params)])
    assert any(g is not None and g.abs().sum() > 0 for g in grads[len(box_params) :])


def test_cross_attention_uses_query_pos_in_layer_0_only_unless_keep_query_pos():
    assert [l.ca_qpos_proj is not None for l in _decoder().layers] == [True, False, False]
    assert [l.ca_qpos_proj is not None for l in _decoder(keep_query_pos=True).layers] == [True, True, True]


def test_removing_decoder_self_attention_makes_queries_independent():
    tgt, memory, pos, reference, mask = _decoder_inputs()
    moved = reference.clone()
    moved[:, 0] = torch.tensor([0.3, 0.7, 0.2, 0.5])  # move query 0 only
    for rm_self_attn, expect_others_unchanged in [(True, True), (False, False)]:
        decoder = _decoder(rm_self_attn_decoder=rm_self_attn)
        assert hasattr(decoder.layers[0], "sa_qcontent_proj") != rm_self_attn
        with torch.no_grad():
            hs, _ = decoder(tgt, memory, pos, reference, mask)
            hs_moved, _ = decoder(tgt, memory, pos, moved, mask)
        assert torch.allclose(hs[:, :, 1:], hs_moved[:, :, 1:], atol=1e-6) == expect_others_unchanged


def test_encoder_scales_position_by_query_scale_of_the_layer_input():
    torch.manual_seed(0)
    encoder = TransformerEncoder(D, HEADS, 2, dim_feedforward=32, dropout=0.0, activation="relu")
    src, pos = torch.randn(2, 6, D), torch.randn(2, 6, D)
    seen = []
    hooks = [l.register_forward_pre_hook(lambda m, args: seen.append(args)) for l in encoder.layers]
    with torch.no_grad():
        encoder(src, pos, None)
    for h in hooks:
        h.remove()
    for layer_src, layer_pos, _ in seen:
        torch.testing.assert_close(layer_pos, pos * encoder.query_scale(layer_src))
    assert not torch.equal(seen[0][0], seen[1][0])


def test_patterns_repeat_over_anchors_pattern_major():
    torch.manual_seed(0)
    transformer = DabDetrTransformer(D, HEADS, 1, 2, 32, num_patterns=2)
    anchors = torch.randn(3, 4)
    seen = []
    transformer.decoder.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        hs, references = transformer(torch.randn(2, D, 2, 3), torch.zeros(2, 2, 3, dtype=torch.bool),
                                     torch.randn(2, D, 2, 3), anchors)
    tgt, reference = seen[0][0], seen[0][3]
    assert hs.shape == (2, 2, 6, D) and references.shape == (2, 2, 6, 4)
    for b in range(2):
        for p in range(2):
            for q in range(3):
                torch.testing.assert_close(tgt[b, p * 3 + q], transformer.patterns.weight[p])
                torch.testing.assert_close(reference[b, p * 3 + q], anchors[q].sigmoid())


def test_without_patterns_content_queries_start_at_zero():
    transformer = DabDetrTransformer(D, HEADS, 1, 1, 32)
    seen = []
    transformer.decoder.register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        transformer(torch.randn(1, D, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), torch.randn(1, D, 2, 2),
                    torch.randn(4, 4))
    assert transformer.patterns is None and seen[0][0].shape == (1, 4, D) and not seen[0][0].any()


def test_transformer_init_is_xavier_except_the_box_mlp():
    torch.manual_seed(0)
    transformer = DabDetrTransformer(64, 4, 1, 1, 128)
    weight = transformer.decoder.layers[0].ca_qcontent_proj.weight  # 64x64: xavier bound sqrt(6/128)
    assert weight.abs().max() <= (6 / 128) ** 0.5 and weight.abs().max() > 0.9 * (6 / 128) ** 0.5
    box = transformer.decoder.bbox_embed.layers[0].weight  # nn.Linear default: bound 1/sqrt(64)
    assert box.abs().max() <= 1 / 8 and box.abs().max() > 0.9 / 8


@pytest.mark.parametrize("bad, match", [({"query_scale_type": "nope"}, "query_scale_type"),
                                        ({"activation": "tanh"}, "activation")])
def test_bad_options_are_named_in_the_error(bad, match):
    with pytest.raises(ValueError, match=match):
        DabDetrTransformer(D, HEADS, 1, 1, 32, **bad)


def test_ffn_relu_works_in_place_only_without_gradients():
    """Inference reuses the FFN's hidden tensor; training keeps it out of place (measured faster there)."""
    from dab_detr.modeling.transformer import build_activation

    relu = build_activation("relu")
    x = torch.randn(4, 8)
    expected = x.clamp(min=0)
    with torch.no_grad():
        inference_input = x.clone()
        assert relu(inference_input) is inference_input and torch.equal(inference_input, expected)
    training_input = x.clone().requires_grad_()
    out = relu(training_input)
    assert out is not training_input and torch.equal(out, expected) and torch.equal(training_input.detach(), x)
