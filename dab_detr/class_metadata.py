"""The classes a model was trained on, stored in its checkpoints, so that drawing, evaluating or exporting it
needs only the config and the checkpoint.

`tools/train_net.py` passes a `DatasetMetadata` to the checkpointer as an extra checkpointable: every checkpoint it
writes has a top-level entry `"dataset_metadata": {"thing_classes": [...], "thing_dataset_id_to_contiguous_id":
{...}}` taken from the training dataset. Checkpoints without it (converted official / HF weights) fall back to the
config's test dataset.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

__all__ = ["KEY", "DatasetMetadata", "apply_checkpoint_classes", "inference_classes", "inspect_checkpoint",
           "read_dataset_metadata"]

KEY = "dataset_metadata"


class DatasetMetadata:
    """Checkpointable (`state_dict` / `load_state_dict`) with a dataset's `thing_classes` and its
    `thing_dataset_id_to_contiguous_id`. Loading keeps what it read in `loaded` and never replaces what is saved:
    fine-tuning from a checkpoint of other classes still saves the classes of the data being trained on."""

    def __init__(self, thing_classes: Sequence[str], thing_dataset_id_to_contiguous_id: Optional[Dict] = None):
        self.thing_classes = list(thing_classes)
        self.thing_dataset_id_to_contiguous_id = {
            int(k): int(v) for k, v in (thing_dataset_id_to_contiguous_id or {}).items()
        }
        self.loaded: Optional[dict] = None

    @classmethod
    def from_datasets(cls, names: Union[str, Sequence[str]]) -> "DatasetMetadata":
        """From the `MetadataCatalog` of the (first) registered dataset in `names`."""
        from detectron2.data import DatasetCatalog, MetadataCatalog

        name = names if isinstance(names, str) else names[0]
        meta = MetadataCatalog.get(name)
        if meta.get("thing_classes") is None or (
            meta.get("thing_dataset_id_to_contiguous_id") is None and meta.get("json_file")
        ):
            DatasetCatalog.get(name)  # loaders fill in the metadata
        return cls(meta.get("thing_classes", []), meta.get("thing_dataset_id_to_contiguous_id", None))

    def state_dict(self) -> dict:
        return {
            "thing_classes": list(self.thing_classes),
            "thing_dataset_id_to_contiguous_id": dict(self.thing_dataset_id_to_contiguous_id),
        }

    def load_state_dict(self, state: dict) -> None:
        self.loaded = dict(state)


def inspect_checkpoint(checkpoint: str) -> Tuple[Optional[dict], Optional[int]]:
    """`(the "dataset_metadata" entry or None, the classifier's class count or None)` of a local checkpoint file;
    `(None, None)` for a file that is missing, remote or unreadable (the checkpointer reports those by name)."""
    import torch
    from detectron2.utils.file_io import PathManager

    if not checkpoint or checkpoint.startswith(("http://", "https://", "detectron2://")):
        return None, None
    try:
        path = PathManager.get_local_path(checkpoint)
        try:  # mmap: only the small entries are read here; the tools then load the weights through the checkpointer
            data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None, None
    if not isinstance(data, dict):
        return None, None
    meta = data.get(KEY)
    bias = data.get("model", {}).get("head.class_embed.bias") if isinstance(data.get("model"), dict) else None
    meta = meta if isinstance(meta, dict) and meta.get("thing_classes") else None
    return meta, (int(bias.shape[0]) if hasattr(bias, "shape") else None)


def read_dataset_metadata(checkpoint: str) -> Optional[dict]:
    """The `"dataset_metadata"` entry of a checkpoint file (None if it has none)."""
    return inspect_checkpoint(checkpoint)[0]


def _short(classes: Sequence[str]) -> str:
    return f"{list(classes)[:5]}{'...' if len(classes) > 5 else ''}"


def apply_checkpoint_classes(cfg, checkpoint: str, dataset_names: Sequence[str] = ()) -> Optional[List[str]]:
    """Set `cfg.model.num_classes` from the checkpoint's classes and return them; with `dataset_names`, check that
    those datasets have the same classes in the same order (one-line `ValueError` naming the first that differs).
    Returns None (and changes nothing) when the checkpoint carries no classes."""
    from detectron2.data import MetadataCatalog

    meta = read_dataset_metadata(checkpoint)
    if meta is None:
        return None
    classes = list(meta["thing_classes"])
    for name in dataset_names:
        theirs = MetadataCatalog.get(name).get("thing_classes")
        if theirs is not None and list(theirs) != classes:
            raise ValueError(
                f"dataset {name!r} has the classes {_short(theirs)} but {checkpoint} was trained on "
                f"{_short(classes)} ({len(theirs)} vs {len(classes)} classes, or another order)"
            )
    if cfg.model.get("num_classes") != len(classes):
        logger.info(f"model.num_classes = {len(classes)} (from the classes stored in {checkpoint})")
    cfg.model.num_classes = len(classes)
    return classes


def inference_classes(cfg) -> List[str]:
    """The class names for drawing or exporting the model of `cfg.train.init_checkpoint`, and `cfg.model.num_classes`
    set to match: the checkpoint's own classes, else (converted weights) those of the config's test dataset, which
    must then have the checkpoint's class count."""
    from detectron2.data import MetadataCatalog

    from .data.coco import num_classes_of

    checkpoint = cfg.train.get("init_checkpoint", "")
    meta, rows = inspect_checkpoint(checkpoint)
    if meta is not None:
        return apply_checkpoint_classes(cfg, checkpoint)
    names = cfg.dataloader.test.dataset.names
    name = names if isinstance(names, str) else names[0]
    count = num_classes_of(name)
    if rows is not None and rows != count:
        raise ValueError(
            f"{checkpoint} stores no class names and its classifier has {rows} classes, but the test dataset "
            f"{name!r} has {count}: pass the dataset it was trained on with --register-coco NAME JSON IMAGE_ROOT "
            "dataloader.test.dataset.names=NAME"
        )
    cfg.model.num_classes = count
    return list(MetadataCatalog.get(name).get("thing_classes"))
