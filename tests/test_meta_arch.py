import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.structures import Boxes, ImageList, Instances

from dab_detr.config import add_dab_detr_config
from dab_detr.meta_arch import DABDETR
from dab_detr.modeling.criterion import SetCriterion
from dab_detr.modeling.dab_detr_head import DabDetrHead
from dab_detr.modeling.matcher import HungarianMatcher
from tests.helpers import training_inputs, uint8_image

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "models")
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
# Exact parameter counts (all parameters, trainable or not; FrozenBN statistics are buffers) with 80 classes.
# Paper Table 2: R50 44M, R101 63M.
R50_PARAMS = 43_668_690
R101_PARAMS = 62_608_594


def _tiny_model(num_classes=4, criterion=True, num_select=10, **head_kwargs) -> DABDETR:
    torch.manual_seed(0)
    backbone = ResNet(
        BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        ResNet.make_default_stages(depth=18, norm="FrozenBN"),
        out_features=["res5"],
        freeze_at=1,
    )
    head = DabDetrHead(
        num_classes=num_classes, hidden_dim=32, num_queries=8, nheads=4, num_encoder_layers=1,
        num_decoder_layers=2, dim_feedforward=64, **head_kwargs,
    )
    crit = SetCriterion(num_classes, HungarianMatcher()) if criterion else None
    return DABDETR(backbone=backbone, head=head, criterion=crit, num_classes=num_classes, pixel_mean=MEAN,
                   pixel_std=STD, num_select=num_select)


def _assert_same_instances(a: Instances, b: Instances):
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.pred_classes, b.pred_classes)


def test_inference_returns_k_sane_instances_at_the_requested_size():
    model = _tiny_model(num_select=10).eval()
    inputs = [{"image": uint8_image(100, 150, 0), "height": 200, "width": 300}, {"image": uint8_image(64, 70, 1)}]
    with torch.no_grad():
        outputs = model(inputs)
    for out, (h, w) in zip(outputs, [(200, 300), (64, 70)]):
        inst = out["instances"]
        assert inst.image_size == (h, w) and len(inst) == 10
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 3] <= h).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < 4)).all()


def test_inference_picks_top_query_class_pairs_and_scales_by_the_unpadded_size():
    model = _tiny_model(num_select=2)
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1], logits[0, 0, 3] = 5.0, 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.5, 0.25, 1.0, 0.5]]])
    (inst,) = model.inference(logits, boxes, [(40, 100)])
    assert inst.pred_classes.tolist() == [1, 3]
    torch.testing.assert_close(inst.scores, torch.tensor([5.0, 3.0]).sigmoid())
    expected = torch.tensor([[0.0, 0.0, 100.0, 20.0], [40.0, 16.0, 60.0, 24.0]])
    torch.testing.assert_close(inst.pred_boxes.tensor, expected)


def test_an_images_result_does_not_depend_on_the_rest_of_the_batch():
    model = _tiny_model().eval()
    big, other_big, small = uint8_image(128, 160, 0), uint8_image(128, 160, 2), uint8_image(70, 90, 1)
    with torch.no_grad():
        alone = model([{"image": big}])[0]["instances"]
        first = model([{"image": big}, {"image": small}])
        second = model([{"image": other_big}, {"image": small}])
    _assert_same_instances(alone, first[0]["instances"])  # same padded size, the small image is masked out
    _assert_same_instances(first[1]["instances"], second[1]["instances"])  # the neighbour's pixels do not leak


@pytest.mark.parametrize("sizes", [[(64, 96), (64, 96)], [(64, 96), (40, 30)], [(70, 90), (70, 90)]])
def test_preprocess_normalises_and_pads_with_zeros(sizes):
    """One-size batches that need no padding are stacked and normalised at once; the result is the per-image
    normalisation padded with zeros to the size divisibility, bitwise, whichever way it was computed."""
    model = _tiny_model()
    images = [uint8_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    got = model.preprocess_image([{"image": image} for image in images])
    d = model.size_divisibility
    expected = torch.zeros(len(images), 3, -(-max(h for h, _ in sizes) // d) * d, -(-max(w for _, w in sizes) // d) * d)
    for i, image in enumerate(images):
        expected[i, :, : image.shape[1], : image.shape[2]] = (image - model.pixel_mean) / model.pixel_std
    assert torch.equal(got.tensor, expected)
    assert got.image_sizes == [tuple(size) for size in sizes]


def test_padding_mask_marks_cells_without_image_pixels():
    images = ImageList(torch.zeros(2, 3, 96, 96), [(96, 96), (40, 30)])
    mask = DABDETR.padding_mask(images, (3, 3))  # stride 32: cell (i, j) holds pixel rows 32i.., columns 32j..
    expected = torch.tensor([[[False] * 3] * 3, [[False, True, True], [False, True, True], [True, True, True]]])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("padded, feature_size", [((96, 96), (3, 3)), ((100, 70), (7, 9)), ((64, 48), (64, 48)),
                                                  ((33, 65), (5, 3))])
def test_padding_mask_is_the_nearest_downsampled_pixel_mask(padded, feature_size):
    sizes = [padded, (padded[0] - 5, padded[1] // 3), (padded[0] // 2 + 1, padded[1] - 1), (1, 1)]
    images = ImageList(torch.zeros(len(sizes), 3, *padded), sizes)
    pixels = torch.ones(len(sizes), *padded)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :h, :w] = 0
    expected = torch.nn.functional.interpolate(pixels[None], size=feature_size, mode="nearest")[0].bool()
    assert torch.equal(DABDETR.padding_mask(images, feature_size), expected)


def test_training_returns_weighted_losses_and_frozen_parts_get_no_gradient():
    model = _tiny_model().train()
    inputs = training_inputs([(96, 128), (64, 64)], [[[10.0, 20.0, 50.0, 60.0]]] * 2, [[2]] * 2)
    losses = model(inputs)
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_bbox_0", "loss_giou_0"} <= set(losses)
    sum(losses.values()).backward()
    assert model.backbone.stem.conv1.weight.grad is None  # freeze_at=1
    assert model.backbone.res2[0].conv1.weight.grad is not None
    assert model.head.class_embed.weight.grad is not None
    frozen_bn = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_bn and all(not list(m.parameters()) for m in frozen_bn)


def test_targets_are_normalised_cxcywh_of_the_unpadded_image():
    inst = Instances((50, 200))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 60.0, 30.0]]))
    inst.gt_classes = torch.tensor([3])
    (target,) = _tiny_model().prepare_targets([inst]).per_image()
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.4, 0.2, 0.4]]))
    assert target["labels"].tolist() == [3]


def test_training_without_criterion_is_a_clear_error():
    model = _tiny_model(criterion=False).train()
    with pytest.raises(RuntimeError, match="criterion"):
        model([{"image": uint8_image(64, 64, 0)}])


def test_class_count_mismatches_are_errors():
    model = _tiny_model()
    with pytest.raises(ValueError, match="head.num_classes"):
        DABDETR(backbone=model.backbone, head=model.head, criterion=None, num_classes=5, pixel_mean=MEAN,
                pixel_std=STD)
    with pytest.raises(ValueError, match="criterion.num_classes"):
        DABDETR(backbone=model.backbone, head=model.head, criterion=SetCriterion(5, HungarianMatcher()),
                num_classes=4, pixel_mean=MEAN, pixel_std=STD)


def test_head_channels_must_match_the_backbone_feature():
    model = _tiny_model()
    head = DabDetrHead(256, num_classes=4, hidden_dim=32, num_queries=8, nheads=4)
    with pytest.raises(ValueError, match="in_channels=256"):
        DABDETR(backbone=model.backbone, head=head, criterion=None, num_classes=4, pixel_mean=MEAN, pixel_std=STD)
    with pytest.raises(ValueError, match="in_feature"):
        DABDETR(backbone=model.backbone, head=head, criterion=None, num_classes=4, pixel_mean=MEAN, pixel_std=STD,
                in_feature="res4")


def test_pixel_statistics_are_non_persistent_buffers_that_define_the_device():
    model = _tiny_model()
    assert model.device == torch.device("cpu")
    assert "pixel_mean" not in model.state_dict()
    assert dict(model.named_buffers())["pixel_std"].shape == (3, 1, 1)


def test_builds_from_yacs_with_the_channel_count_read_from_the_backbone():
    cfg = get_cfg()
    add_dab_detr_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "DABDETR"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT = MEAN, STD, "RGB"
    c = cfg.MODEL.DAB_DETR
    c.NUM_CLASSES, c.HIDDEN_DIM, c.NUM_QUERIES, c.NUM_ENCODER_LAYERS, c.NUM_DECODER_LAYERS, c.DIM_FEEDFORWARD = (
        3, 32, 6, 1, 2, 64)
    c.NUM_PATTERNS, c.ANCHOR_INIT, c.FREEZE_ANCHOR_XY = 2, "spread", True
    c.DN, c.DENOISING_GROUPS, c.LABEL_NOISE_PROB, c.BOX_NOISE_SCALE = True, 3, 0.5, 0.3
    model = build_model(cfg)
    assert isinstance(model, DABDETR)
    dn = model.head.denoising
    assert (dn.denoising_groups, dn.label_noise_prob, dn.box_noise_scale) == (3, 0.5, 0.3)
    assert model.head.input_proj.in_channels == 512  # R18's res5, read from backbone.output_shape()
    assert model.num_classes == model.head.num_classes == model.criterion.num_classes == 3
    assert model.head.transformer.num_patterns == 2 and hasattr(model.head, "anchor_xy")
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": uint8_image(64, 96, 0)}])
    assert len(out["instances"]) == 6 * 2 * 3  # num_select 300 capped at queries x classes


# DAB-Deformable-DETR's model configs are checked in tests/test_meta_arch_deformable.py
SHIPPED = sorted(f for f in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if "deformable" not in os.path.basename(f))


def test_all_model_configs_are_shipped():
    names = {os.path.basename(f)[:-3] for f in SHIPPED}
    assert names == {"dab_detr_r50", "dab_detr_r50_dc5", "dab_detr_r101", "dab_detr_r101_dc5",
                     "dab_detr_r50_3patterns", "dab_detr_r50_dc5_3patterns"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.basename(p)[:-3])
def test_shipped_config_instantiates(path):
    name = os.path.basename(path)[:-3]
    model = instantiate(LazyConfig.load(path).model)
    assert isinstance(model, DABDETR) and model.num_classes == 80 and model.head.input_proj.in_channels == 2048
    patterns = 3 if "3patterns" in name else 0
    assert model.head.transformer.num_patterns == patterns
    # DC5: res5 at stride 16, its block 0 undilated (torchvision / official convention)
    dc5 = "dc5" in name
    assert model.backbone.output_shape()["res5"].stride == (16 if dc5 else 32)
    assert [b.conv2.dilation[0] for b in model.backbone.res5] == ([1, 2, 2] if dc5 else [1, 1, 1])
    assert len(model.backbone.res4) == (23 if "r101" in name else 6)
    # Released weights: plain DC5 used image PE temperature 10, every other variant 20.
    assert model.head.position_embedding.temperature_h == (10 if name == "dab_detr_r50_dc5" else 20)
    params = sum(p.numel() for p in model.parameters())
    expected = R101_PARAMS if "r101" in name else R50_PARAMS
    assert params == expected + patterns * 256


def test_num_classes_is_set_in_one_place():
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "dab_detr_r50_3patterns.py"))
    cfg.model.num_classes = 7
    model = instantiate(cfg.model)
    assert model.num_classes == model.head.num_classes == model.criterion.num_classes == 7
    assert model.head.class_embed.out_features == 7


@pytest.mark.parametrize("bad, match", [({"depth": 34}, "depth"), ({"res5_dilation": 4}, "res5_dilation")])
def test_resnet_stages_rejects_unsupported_options(bad, match):
    from dab_detr.meta_arch import resnet_stages

    with pytest.raises(ValueError, match=match):
        resnet_stages(**bad)


def test_yacs_r50_builds_the_lazyconfig_r50():
    """configs/yacs/dab_detr_R_50.yaml and configs/models/dab_detr_r50.py: same parameters, same outputs."""
    cfg = get_cfg()
    add_dab_detr_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, "..", "yacs", "dab_detr_R_50.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    yacs_model = build_model(cfg).eval()
    lazy_model = instantiate(LazyConfig.load(os.path.join(CONFIG_DIR, "dab_detr_r50.py")).model).eval()
    assert sum(p.numel() for p in yacs_model.parameters()) == sum(p.numel() for p in lazy_model.parameters())
    assert sum(p.numel() for p in yacs_model.parameters() if p.requires_grad) == sum(
        p.numel() for p in lazy_model.parameters() if p.requires_grad)  # the same stages frozen
    lazy_model.load_state_dict(yacs_model.state_dict())  # strict: the same names and shapes
    inputs = [{"image": uint8_image(64, 96, 0)}, {"image": uint8_image(80, 48, 1)}]
    with torch.no_grad():
        ours, theirs = yacs_model(inputs), lazy_model(inputs)
    for a, b in zip(ours, theirs):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
