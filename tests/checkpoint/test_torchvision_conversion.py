"""torchvision ResNet checkpoints -> detectron2 backbone keys: our res5 equals torchvision's layer4."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from torch import nn

torchvision = pytest.importorskip("torchvision")

from dab_detr.checkpoint.convert import convert_checkpoint  # noqa: E402
from dab_detr.checkpoint.torchvision import convert_torchvision_resnet  # noqa: E402
from dab_detr.engine import DetrCheckpointer  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _random_torchvision_resnet50(dc5: bool) -> nn.Module:
    """Random weights with BN statistics far from identity, so a BN mapped to the wrong conv shows."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, dc5]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.mark.parametrize("config, dc5", [("dab_detr_r50_50ep.py", False), ("dab_detr_r50_dc5_50ep.py", True)],
                         ids=["r50", "r50_dc5"])
def test_converted_backbone_res5_equals_torchvision_layer4(tmp_path, config, dc5):
    tv = _random_torchvision_resnet50(dc5)
    source = str(tmp_path / "resnet50.pth")
    torch.save(tv.state_dict(), source)  # as torchvision's own weight files are saved
    output = str(tmp_path / "R-50.pth")
    report = convert_checkpoint("torchvision", source, output, config_file=os.path.join(CONFIGS, config))
    assert report.unused_keys == [] and report.num_classes is None
    assert sorted(report.ignored_keys) == sorted(k for k in tv.state_dict() if k.startswith("fc.")
                                                 or k.endswith("num_batches_tracked"))

    state = torch.load(output, weights_only=True)["model"]
    assert all(k.startswith("backbone.") for k in state)
    cfg = LazyConfig.load(os.path.join(CONFIGS, config))
    cfg.model.criterion = None
    model = instantiate(cfg.model).eval()
    DetrCheckpointer(model).load(output)  # what train.init_checkpoint=R-50.pth does: the head stays as initialised
    backbone = model.backbone
    assert set(state) == {"backbone." + k for k in backbone.state_dict()}  # every backbone tensor provided

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3,
                                 tv.layer4)(x)
        got = backbone(x)["res5"]
    assert got.shape == expected.shape == (1, 2048, 4 if dc5 else 2, 4 if dc5 else 2)
    assert expected.abs().max() > 1e-2
    assert (got - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())


def test_unknown_keys_are_reported_and_the_classifier_ignored():
    state = _random_torchvision_resnet50(False).state_dict()
    state["extra_head.weight"] = torch.zeros(1)
    conversion = convert_torchvision_resnet(state)
    assert conversion.unused_keys == ["extra_head.weight"]
    assert "fc.weight" in conversion.ignored_keys and "fc.bias" in conversion.ignored_keys
    assert conversion.state_dict["backbone.res2.0.conv1.norm.running_mean"] is state["layer1.0.bn1.running_mean"]
