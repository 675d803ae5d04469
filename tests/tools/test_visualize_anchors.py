"""tools/visualize_anchors.py and `plot_anchors`: the picture shows the checkpoint's anchors."""
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from matplotlib.patches import Rectangle
from PIL import Image

from dab_detr.visualization import anchors_from_state_dict, plot_anchors

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "dab_detr_synthetic.py")


def test_plot_shows_every_centre_and_the_boxes_of_a_subset():
    anchors = torch.rand(50, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    fig = plot_anchors(anchors, num_boxes=7, seed=1)
    centres, boxes = fig.axes
    np.testing.assert_allclose(centres.collections[0].get_offsets(), anchors[:, :2].numpy(), rtol=1e-6)
    rects = [p for p in boxes.patches if isinstance(p, Rectangle)]
    assert len(rects) == 7
    drawn = sorted((r.get_x() + r.get_width() / 2, r.get_y() + r.get_height() / 2, r.get_width(), r.get_height())
                   for r in rects)
    subset = boxes.collections[0].get_offsets()
    picked = [i for i in range(50) if any(np.allclose(anchors[i, :2].numpy(), c) for c in subset)]
    assert len(picked) == 7
    np.testing.assert_allclose(drawn, sorted(anchors[picked].tolist()), rtol=1e-5, atol=1e-6)
    assert centres.get_ylim() == (1.0, 0.0)  # image coordinates: y grows downwards


def test_anchors_are_found_in_every_checkpoint_layout():
    anchors = torch.randn(5, 4)
    for key in ("head.anchor_box_embed.weight", "refpoint_embed.weight", "model.query_refpoint_embeddings.weight"):
        assert torch.equal(anchors_from_state_dict({key: anchors}), anchors)
    split = {"head.anchor_xy": anchors[:, :2], "head.anchor_wh": anchors[:, 2:]}
    assert torch.equal(anchors_from_state_dict(split), anchors)
    with pytest.raises(ValueError, match="my.pth: no anchors found"):
        anchors_from_state_dict({"x": anchors}, "my.pth")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LazyConfig.load(CONFIG)
    cfg.model.criterion = None
    model = instantiate(cfg.model)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("with_config", [False, True], ids=["checkpoint_only", "with_config"])
def test_tool_writes_a_png(checkpoint, load_tool, tmp_path, capsys, with_config):
    output = tmp_path / "anchors.png"
    argv = [checkpoint, "--output", str(output), "--num-boxes", "10"]
    argv += ["--config-file", CONFIG] if with_config else []
    assert load_tool("visualize_anchors").main(argv) == 0, capsys.readouterr().err
    image = np.asarray(Image.open(output).convert("RGB"))
    assert image.shape == (540, 1000, 3) and image.std() > 10  # a figure with something drawn on it
    assert "30 anchor centres, 10 boxes" in capsys.readouterr().out


def test_tool_reports_a_checkpoint_without_anchors(load_tool, tmp_path, capsys):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, str(path))
    assert load_tool("visualize_anchors").main([str(path), "--output", str(tmp_path / "a.png")]) == 1
    assert f"{path}: no anchors found" in capsys.readouterr().err
