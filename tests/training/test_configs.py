"""Every shipped training config builds its model and its data loader (with a stand-in dataset where COCO is absent)."""
import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

import dab_detr  # noqa: F401
from dab_detr.data.coco import register_coco_datasets, sync_num_classes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def test_every_variant_has_a_config():
    names = {os.path.basename(c) for c in CONFIGS}
    for variant in ("r50", "r50_dc5", "r101", "r101_dc5", "r50_3patterns", "r50_dc5_3patterns"):
        assert f"dab_detr_{variant}_50ep.py" in names
    assert "dab_detr_synthetic.py" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_model_optimizer_schedule_and_loader(path, tiny_coco):
    register_coco_datasets([("standin_train", *tiny_coco["train"]), ("standin_val", *tiny_coco["val"])])
    cfg = LazyConfig.load(path)
    cfg = LazyConfig.apply_overrides(
        cfg,
        [
            "dataloader.train.dataset.names=standin_train",
            "dataloader.test.dataset.names=standin_val",
            "dataloader.train.total_batch_size=2",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
        ],
    )
    assert sync_num_classes(cfg) == 3
    model = instantiate(cfg.model)
    assert model.num_classes == 3 and model.head.num_classes == 3 and model.criterion.num_classes == 3
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    # backbone at lr x factor, the rest at lr (detectron2 groups parameters by lr)
    lrs = {group["lr"] for group in optimizer.param_groups}
    assert cfg.optimizer.lr in lrs
    scheduler = instantiate(cfg.lr_multiplier)
    assert 0 < scheduler(0.5) <= 1
    batch = next(iter(instantiate(cfg.dataloader.train)))
    assert len(batch) == 2 and all(x["image"].dtype == torch.uint8 for x in batch)
    assert all(len(x["instances"]) == len(x["instances"].gt_classes) for x in batch)
    test_batch = next(iter(instantiate(cfg.dataloader.test)))
    assert "instances" not in test_batch[0]
    assert instantiate(cfg.dataloader.evaluator)._metadata.name == "standin_val"
