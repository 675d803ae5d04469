"""Our DAB-DETR equals HuggingFace's `DabDetrForObjectDetection` (which equals the official code, docs/design.md §4)
when HF's weights are mapped into ours with `dab_detr.checkpoint.hf`: same padded batch, eval mode, 1e-4."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402

from benchmarks.models import random_hf_model  # noqa: E402
from dab_detr.checkpoint.hf import convert_hf_state_dict, load_hf_state_dict  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "models")
NUM_CLASSES = 7
TOL = 1e-4


def _hf_model(**config_kwargs):
    """A random HF model with our training settings and no zero/identity weights left to hide mapping errors."""
    config = transformers.DabDetrConfig(
        use_pretrained_backbone=False, num_labels=NUM_CLASSES, dropout=0.0, auxiliary_loss=True, **config_kwargs
    )
    return random_hf_model(config, seed=0)


def _our_model(config_name, **head_overrides):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, config_name + ".py"))
    cfg.model.num_classes = NUM_CLASSES
    cfg.model.criterion = None
    cfg.model.head.inverse_sigmoid_eps = 1e-5  # HF's value (ours defaults to the official 1e-3)
    for key, value in head_overrides.items():
        setattr(cfg.model.head, key, value)
    return instantiate(cfg.model).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 128, 160, generator=g), torch.randn(3, 96, 120, generator=g)]
    images = ImageList.from_tensors(images, 32)
    pixel_mask = torch.zeros(len(images), *images.tensor.shape[-2:], dtype=torch.long)
    for i, (h, w) in enumerate(images.image_sizes):
        pixel_mask[i, :h, :w] = 1
    return images, pixel_mask


def _max_diffs(hf_model, our_model):
    images, pixel_mask = _batch()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2
    with torch.no_grad():
        expected = hf_model(pixel_values=images.tensor, pixel_mask=pixel_mask, labels=labels)  # labels: HF's aux
        ours = our_model.forward_raw(images)
    pairs = [(ours["pred_logits"], expected.logits), (ours["pred_boxes"], expected.pred_boxes)]
    assert len(ours["aux_outputs"]) == len(expected.auxiliary_outputs) == 5
    for a, b in zip(ours["aux_outputs"], expected.auxiliary_outputs):
        pairs += [(a["pred_logits"], b["logits"]), (a["pred_boxes"], b["pred_boxes"])]
    for a, b in pairs:
        assert a.shape == b.shape
    # the two images must differ, or a batch mix-up could pass
    assert (expected.logits[0] - expected.logits[1]).abs().max() > 1e-2
    return [(a - b).abs().max().item() for a, b in pairs]


@pytest.mark.parametrize(
    "config_name, hf_kwargs, head_overrides",
    [
        ("dab_detr_r50", {}, {}),
        ("dab_detr_r50_dc5", {"dilation": True, "temperature_height": 10, "temperature_width": 10}, {}),
        # frozen x, y anchors load the HF anchors through the head's split layout
        ("dab_detr_r50_dc5_3patterns", {"dilation": True, "num_patterns": 3}, {"freeze_anchor_xy": True}),
        ("dab_detr_r50", {"keep_query_pos": True}, {"keep_query_pos": True}),
    ],
    ids=["r50", "r50_dc5", "r50_dc5_3patterns", "r50_keep_query_pos"],
)
def test_outputs_and_aux_outputs_match_huggingface(config_name, hf_kwargs, head_overrides):
    hf_model = _hf_model(**hf_kwargs)
    ours = _our_model(config_name, **head_overrides)
    result = load_hf_state_dict(ours, hf_model.state_dict())
    assert result.ignored_keys == [k for k in hf_model.state_dict() if k.startswith("model.decoder.bbox_embed.")]
    diffs = _max_diffs(hf_model, ours)
    assert max(diffs) < TOL, diffs


def test_hf_native_resnet_backbone_matches_huggingface():
    hf_model = _hf_model(backbone_config=transformers.ResNetConfig(out_features=["stage4"]), use_timm_backbone=False)
    ours = _our_model("dab_detr_r50")
    load_hf_state_dict(ours, hf_model.state_dict())
    diffs = _max_diffs(hf_model, ours)
    assert max(diffs) < TOL, diffs


@pytest.fixture(scope="module")
def hf_r50_state_dict():
    return _hf_model().state_dict()


def test_every_hf_key_is_consumed(hf_r50_state_dict):
    conversion = convert_hf_state_dict(hf_r50_state_dict)
    assert conversion.unused_keys == []
    # 6 encoder layers x q/k/v x weight/bias are packed into in_proj_weight / in_proj_bias
    assert len(conversion.state_dict) + len(conversion.ignored_keys) == len(hf_r50_state_dict) - 6 * 4


def test_unknown_and_missing_keys_are_reported(hf_r50_state_dict):
    ours = _our_model("dab_detr_r50")
    state = dict(hf_r50_state_dict)
    state["model.something_new.weight"] = torch.zeros(1)
    del state["model.decoder.ref_anchor_head.layers.0.bias"]
    with pytest.raises(ValueError, match="something_new") as err:
        load_hf_state_dict(ours, state)
    assert "head.transformer.decoder.ref_anchor_head.layers.0.bias" in str(err.value)
    result = load_hf_state_dict(ours, state, strict=False)
    assert result.unused_keys == ["model.something_new.weight"]
    assert result.missing_keys == ["head.transformer.decoder.ref_anchor_head.layers.0.bias"]


def test_class_count_mismatch_is_reported(hf_r50_state_dict):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "dab_detr_r50.py"))
    cfg.model.num_classes, cfg.model.criterion = NUM_CLASSES + 1, None
    with pytest.raises(ValueError, match="head.class_embed.weight"):
        load_hf_state_dict(instantiate(cfg.model), hf_r50_state_dict)


def test_untied_box_heads_are_an_error(hf_r50_state_dict):
    state = dict(hf_r50_state_dict)
    state["model.decoder.bbox_embed.layers.0.bias"] = state["model.decoder.bbox_embed.layers.0.bias"] + 1
    with pytest.raises(ValueError, match="tied"):
        convert_hf_state_dict(state)
