"""bf16 autocast on the CPU (`train.amp.enabled=True` on a CPU): training runs and stays finite, the matcher's cost
stays fp32, and attention runs in fp32 inside autocast (torch's bf16 CPU attention is slow)."""
import os

import torch
from detectron2.config import LazyConfig, instantiate

from benchmarks.models import as_batched_inputs, make_images, make_targets
from dab_detr.modeling.attention import multi_head_attention
from dab_detr.modeling.matcher import HungarianMatcher

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dab_detr_synthetic.py")


def test_bf16_training_steps_stay_finite_with_an_fp32_matcher(monkeypatch):
    cfg = LazyConfig.load(CONFIG)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    data = as_batched_inputs(make_images(2, (64, 64)), make_targets(2, num_classes=5, sizes=[2, 3]))

    cost_dtypes = []
    cost_matrix = HungarianMatcher.cost_matrix

    def recording_cost_matrix(self, *args):
        cost = cost_matrix(self, *args)
        cost_dtypes.append(cost.dtype)
        return cost

    monkeypatch.setattr(HungarianMatcher, "cost_matrix", recording_cost_matrix)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = model(data)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        assert torch.isfinite(grad_norm)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert cost_dtypes and set(cost_dtypes) == {torch.float32}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained


def test_attention_under_cpu_autocast_is_fp32_attention_of_the_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 5, 32, generator=g).bfloat16() for _ in range(2))
    v = torch.randn(2, 5, 16, generator=g).bfloat16()
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., -2:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = multi_head_attention(q, k, v, num_heads=4, attn_mask=mask)
    expected = multi_head_attention(q.float(), k.float(), v.float(), num_heads=4, attn_mask=mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.bfloat16(), rtol=0, atol=0)


def test_prelu_bf16_path_is_prelu_in_value_and_gradient():
    """The FFN's PReLU (own backward in training; bf16 CPU inputs as relu(x) - a * relu(-x)) computes F.prelu's
    value and gradients: in fp32 to float rounding, x = 0 included (slope a there); in bf16 to bf16 rounding."""
    from dab_detr.modeling.transformer import PReLU

    act = PReLU()
    with torch.no_grad():
        act.weight.fill_(0.3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 32, generator=g)
    x[0, 0, :5] = 0.0
    grad = torch.randn(4, 7, 32, generator=g)

    def value_and_grads(fn, x, grad):
        x = x.clone().requires_grad_()
        act.weight.grad = None
        out = fn(x)
        out.backward(grad)
        return out, x.grad, act.weight.grad.clone()

    reference = value_and_grads(lambda x: torch.nn.functional.prelu(x, act.weight), x, grad)
    for got, expected in zip(value_and_grads(act, x, grad), reference):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)

    got = value_and_grads(act, x.bfloat16(), grad.bfloat16())
    expected = value_and_grads(lambda x: torch.nn.functional.prelu(x, act.weight),
                               x.bfloat16().float(), grad.bfloat16().float())
    assert got[0].dtype == torch.bfloat16 and act.weight.dtype == torch.float32
    torch.testing.assert_close(got[0].float(), expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1].float(), expected[1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # without gradients, fp32: exactly F.prelu
        assert torch.equal(act(x), torch.nn.functional.prelu(x, act.weight))
