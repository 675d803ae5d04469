"""DAB-Deformable-DETR detectron2 glue: shared DAB-DETR pipeline, several levels, encoder loss, configs."""
import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone import BasicStem, ResNet

from dab_detr.meta_arch import DABDETR
from dab_detr.meta_arch_deformable import DABDeformableDETR
from dab_detr.modeling.criterion import SetCriterion
from dab_detr.modeling.dab_deformable_head import DabDeformableDetrHead
from dab_detr.modeling.matcher import HungarianMatcher
from tests.helpers import training_inputs, uint8_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _tiny_model(two_stage=False, in_features=("res3", "res4", "res5"), num_feature_levels=4, **head_kwargs):
    torch.manual_seed(0)
    backbone = ResNet(
        BasicStem(in_channels=3, out_channels=64, norm="FrozenBN"),
        ResNet.make_default_stages(depth=18, norm="FrozenBN"),
        out_features=["res2", "res3", "res4", "res5"],
        freeze_at=1,
    )
    head = DabDeformableDetrHead(
        num_classes=4, hidden_dim=32, num_queries=8, nheads=4, num_encoder_layers=1, num_decoder_layers=2,
        dim_feedforward=64, num_feature_levels=num_feature_levels, enc_n_points=2, dec_n_points=2,
        two_stage=two_stage, **head_kwargs,
    )
    return DABDeformableDETR(
        backbone=backbone, head=head, criterion=SetCriterion(4, HungarianMatcher()), num_classes=4,
        in_features=list(in_features), pixel_mean=MEAN, pixel_std=STD, num_select=10,
    )


def _inputs_with_instances():
    boxes = [[4.0, 6.0, 30.0, 40.0], [10.0, 2.0, 20.0, 12.0]]
    return training_inputs([(64, 96), (80, 48)], [boxes, boxes], [[1, 3], [1, 3]])


def test_is_a_dabdetr_sharing_its_inference():
    model = _tiny_model().eval()
    assert isinstance(model, DABDETR) and model.in_features == ["res3", "res4", "res5"]
    with torch.no_grad():
        out = model([{"image": uint8_image(64, 96, 0), "height": 128, "width": 192}, {"image": uint8_image(80, 48, 1)}])
    assert len(out[0]["instances"]) == 10 and out[0]["instances"].image_size == (128, 192)
    assert out[1]["instances"].image_size == (80, 48)


@pytest.mark.parametrize("two_stage", [False, True])
def test_training_losses_and_frozen_stem(two_stage):
    model = _tiny_model(two_stage).train()
    losses = model(_inputs_with_instances())
    assert ("loss_class_enc" in losses) == two_stage and "loss_giou_0" in losses
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.stem.parameters())
    assert all(p.grad is not None for n, p in model.head.named_parameters()), "a head parameter got no gradient"


@pytest.mark.parametrize("two_stage", [False, True])
def test_denoising_training_through_the_meta_architecture(two_stage):
    """With `dn` on, the step's targets reach the head: DN losses on every decoder layer, all head params train."""
    model = _tiny_model(two_stage, dn=True).train()
    losses = model(_inputs_with_instances())
    assert {"loss_class_dn", "loss_bbox_dn", "loss_giou_dn", "loss_giou_dn_0"} <= set(losses)
    assert not any(k.endswith("_dn_enc") for k in losses)  # the encoder loss has no denoising part
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for n, p in model.head.named_parameters()), "a head parameter got no gradient"


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(in_features=("res3", "res9")), "in_features"),
        (dict(in_features=("res5", "res3")), "increasing strides"),
        (dict(in_features=("res2", "res3", "res4", "res5"), num_feature_levels=3), "num_feature_levels"),
    ],
)
def test_bad_configuration_is_a_one_line_error_at_build_time(kwargs, option):
    with pytest.raises(ValueError, match=option) as err:
        _tiny_model(**kwargs)
    assert "\n" not in str(err.value)


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*deformable*.py")))
CONFIGS += sorted(glob.glob(os.path.join(ROOT, "configs", "models", "*deformable*.py")))


def test_the_deformable_configs_are_shipped():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    assert names == {"dab_deformable_detr_r50_50ep.py", "dab_deformable_detr_r50_two_stage_50ep.py",
                     "dab_deformable_detr_synthetic.py", "models/dab_deformable_detr_r50.py",
                     "dn_dab_deformable_detr_r50_50ep.py"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_every_deformable_config_instantiates(path):
    cfg = LazyConfig.load(path)
    model = instantiate(cfg.model)
    assert isinstance(model, DABDeformableDETR)
    assert model.head.two_stage == ("two_stage" in path)
    dn = os.path.basename(path).startswith("dn_")
    assert (model.head.denoising is not None) == dn
    if dn:
        gen = model.head.denoising
        assert (gen.denoising_groups, gen.label_noise_prob, gen.box_noise_scale) == (5, 0.2, 0.4)
        assert model.head.num_queries == 300 and model.head.num_patterns == 0
    assert len(model.head.input_proj) == (3 if "synthetic" in path else 4)
    if "synthetic" not in path:
        assert cfg.get("optimizer") is None or cfg.optimizer.lr == 1e-4
    if "50ep" in path:
        assert cfg.train.clip_grad.max_norm == 0.1 and cfg.dataloader.train.total_batch_size == 16
        assert cfg.optimizer.weight_decay == 1e-4 and cfg.optimizer.params.lr_factor_func.factor == 0.1
        assert cfg.lr_multiplier.scheduler.milestones == [300000, 375000]
