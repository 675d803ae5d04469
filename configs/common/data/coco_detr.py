# COCO 2017 with DETR's augmentations (flip; multi-scale resize, or resize -> crop -> resize with p=0.5).
# Datasets are read from $DETECTRON2_DATASETS/coco (detectron2's builtin `coco_2017_*` registrations).
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from dab_detr.data import (
    DetrDatasetMapper,
    build_detr_crop_augmentation,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
)
from dab_detr.engine import build_resumable_train_loader

dataloader = OmegaConf.create()

dataloader.train = L(build_resumable_train_loader)(  # detectron2's loader, resumable exactly (docs/reliability.md)
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DetrDatasetMapper)(
        augmentation=L(build_detr_train_augmentation)(min_sizes=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], max_size=1333),
        augmentation_with_crop=L(build_detr_crop_augmentation)(
            pre_crop_sizes=[400, 500, 600], crop_size=[384, 600],
            min_sizes="${..augmentation.min_sizes}", max_size="${..augmentation.max_size}",
        ),
        is_train=True,
        image_format="RGB",
    ),
    total_batch_size=16,  # the paper's 8 GPUs x 2 images
    seed="${...train.seed}",
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        augmentation=L(build_detr_test_augmentation)(min_size=800, max_size=1333),
        augmentation_with_crop=None,
        is_train=False,
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
