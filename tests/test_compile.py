"""The inference path (`DABDETR.forward_raw`: backbone with folded FrozenBN, channels-last, head) compiles into one
graph with `torch.compile` and gives the eager outputs."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import ImageList

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dab_detr_synthetic.py")


def _tiny_model():
    """The synthetic recipe's model (tiny ResNet, d=128, 3+3 layers), with FrozenBN so the BN fold is compiled too."""
    cfg = LazyConfig.load(CONFIG)
    cfg.model.backbone.stem.norm = "FrozenBN"
    cfg.model.backbone.stages.norm = "FrozenBN"
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-identity statistics, so a dropped or misapplied norm shows
        for m in model.backbone.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


def _images():
    """A padded batch of two images of different sizes (the padding mask is part of the graph)."""
    g = torch.Generator().manual_seed(2)
    return ImageList(torch.randn(2, 3, 128, 160, generator=g), [(128, 160), (96, 128)])


def _max_diff(a, b):
    pairs = [(a["pred_logits"], b["pred_logits"]), (a["pred_boxes"], b["pred_boxes"])]
    pairs += [(x[k], y[k]) for x, y in zip(a["aux_outputs"], b["aux_outputs"]) for k in x]
    return max((x - y).abs().max().item() for x, y in pairs)


def test_forward_raw_traces_into_one_graph_without_breaks():
    model, images = _tiny_model(), _images()
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_raw, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    with torch.no_grad():
        assert _max_diff(compiled(images), model.forward_raw(images)) < 1e-5


@pytest.mark.slow
def test_inductor_compiled_inference_matches_eager():
    model, images = _tiny_model(), _images()
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_raw, fullgraph=True)
    with torch.no_grad():
        expected = model.forward_raw(images)
        assert _max_diff(compiled(images), expected) < 1e-4
