"""Datasets named on the command line, and the class count taken from them in one place."""
import functools
import logging
import os
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco_json import coco_category_names, load_coco_detection_json
from .errors import ConfigError, DatasetError, MissingFileError

logger = logging.getLogger(__name__)


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> List[str]:
    """Register `(name, json_file, image_root)` triples as COCO-format datasets (`--register-coco`).

    The class names are read from the json now, so the class count is known before the model is built; the
    annotations are loaded (and checked, see `coco_json.load_coco_detection_json`) when the dataset is first used.
    """
    names = []
    for name, json_file, image_root in specs:
        if not os.path.isfile(json_file):
            raise MissingFileError(f"--register-coco {name}: annotation file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise MissingFileError(f"--register-coco {name}: image folder not found: {image_root}")
        classes = coco_category_names(json_file)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, functools.partial(load_coco_detection_json, json_file, image_root, name)
        )
        MetadataCatalog.get(name).set(
            json_file=json_file, image_root=image_root, evaluator_type="coco", thing_classes=classes
        )
        logger.info(f"Registered COCO-format dataset {name!r}: {len(classes)} classes, {json_file}")
        names.append(name)
    return names


def num_classes_of(dataset_names: Union[str, Sequence[str]]) -> int:
    """Number of `thing_classes` of registered datasets; all of them must agree."""
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    counts = {}
    for name in names:
        if name not in DatasetCatalog.list():
            raise ConfigError(f"Dataset {name!r} is not registered (use --register-coco NAME JSON IMAGE_ROOT)")
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes")
        if classes is None and meta.get("json_file"):
            classes = coco_category_names(meta.json_file)
        if classes is None:
            DatasetCatalog.get(name)  # loaders usually fill the metadata
            classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            raise DatasetError(f"Dataset {name!r} has no thing_classes metadata: cannot tell its class count")
        counts[name] = len(classes)
    if len(set(counts.values())) != 1:
        raise ConfigError(f"Datasets disagree on the number of classes: {counts}")
    return next(iter(counts.values()))


def sync_num_classes(cfg, explicit: Optional[int] = None) -> int:
    """Set `cfg.model.num_classes` from the training (and test) datasets' categories.

    The head and the criterion read it by interpolation, so this is the one place the count is set. An explicit
    `model.num_classes=N` on the command line that disagrees with the data is an error, not a silent choice.
    """
    names = list(_as_list(cfg.dataloader.train.dataset.names))
    test = cfg.dataloader.get("test")
    if test is not None and "dataset" in test and test.dataset.get("names"):
        names += [n for n in _as_list(test.dataset.names) if n not in names]
    n = num_classes_of(names)
    if explicit is not None and explicit != n:
        raise ConfigError(
            f"model.num_classes={explicit} was given, but the dataset(s) {names} have {n} categories. "
            "Drop the override: the class count is taken from the dataset."
        )
    if cfg.model.get("num_classes") != n:
        logger.info(f"model.num_classes = {n} (from the categories of {names})")
    cfg.model.num_classes = n
    return n


def _as_list(names) -> Tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)
