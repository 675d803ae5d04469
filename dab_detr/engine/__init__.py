"""Training glue on top of detectron2's engine: trainer step, checkpointing, dataset/class-count set-up."""
from .checkpointer import DetrCheckpointer
from .datasets import num_classes_of, register_coco_datasets, sync_num_classes
from .trainer import DetrTrainer

__all__ = [
    "DetrCheckpointer",
    "DetrTrainer",
    "num_classes_of",
    "register_coco_datasets",
    "sync_num_classes",
]
