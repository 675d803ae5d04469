import os

import pytest

from dab_detr.data.synthetic import SyntheticParams, generate_synthetic_dataset
from tests.helpers import TINY_SYNTHETIC_OVERRIDES

_TINY_MODEL = [*TINY_SYNTHETIC_OVERRIDES, "model.head.num_queries=10"]


@pytest.fixture(scope="session")
def tiny_model_overrides():
    """Command-line overrides that shrink configs/dab_detr_synthetic.py to a model that trains in seconds."""
    return list(_TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A small COCO-format dataset on disk: 3 classes (not the synthetic default's 5), 64 px images."""
    root = tmp_path_factory.mktemp("tiny_coco")
    params = SyntheticParams(num_train=16, num_val=8, image_size=64, num_classes=3, max_objects=3, seed=7)
    folder = generate_synthetic_dataset(params, str(root))
    return {
        split: (os.path.join(folder, "annotations", f"instances_{split}.json"), os.path.join(folder, split))
        for split in ("train", "val")
    }


@pytest.fixture(scope="session")
def tiny_coco_args(tiny_coco):
    """tools/train_net.py arguments that register `tiny_coco` and train / evaluate on it, loading in-process."""
    (train_json, train_root), (val_json, val_root) = tiny_coco["train"], tiny_coco["val"]
    return [
        "--register-coco", "tiny_train", train_json, train_root,
        "--register-coco", "tiny_val", val_json, val_root,
        "dataloader.train.dataset.names=tiny_train",
        "dataloader.test.dataset.names=tiny_val",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]
