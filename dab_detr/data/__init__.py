"""Data: DETR's dataset mapper and the embedded synthetic dataset."""

from .mapper import (
    DetrDatasetMapper,
    build_detr_crop_augmentation,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
)
from .synthetic import SyntheticParams, generate_synthetic_dataset, register_synthetic_dataset

__all__ = [
    "DetrDatasetMapper",
    "build_detr_train_augmentation",
    "build_detr_crop_augmentation",
    "build_detr_test_augmentation",
    "SyntheticParams",
    "generate_synthetic_dataset",
    "register_synthetic_dataset",
]
