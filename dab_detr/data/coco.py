"""COCO-format datasets: registration on detectron2's `register_coco_instances` / `load_coco_json`, and the class
count taken from the datasets in one place."""
import functools
import logging
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from ..errors import ConfigError, DatasetError, MissingFileError
from .validate import coco_category_names, validate_coco_json

__all__ = ["register_coco_dataset", "register_coco_datasets", "num_classes_of", "sync_num_classes"]

logger = logging.getLogger(__name__)


def register_coco_dataset(
    name: str, json_file: str, image_root: str, category_ids: Sequence[int], thing_classes: Sequence[str],
    prepare: Optional[Callable[[], object]] = None,
) -> None:
    """detectron2's `register_coco_instances` with the class metadata set now (the class count is known before
    the json is loaded), replacing an earlier registration of `name`.

    Args:
        category_ids, thing_classes: the json's category ids in increasing order, and their names.
        prepare: called before the json is first read (the embedded dataset generates its files there).
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    metadata = {
        "thing_classes": list(thing_classes),
        "thing_dataset_id_to_contiguous_id": {cid: i for i, cid in enumerate(category_ids)},
    }
    register_coco_instances(name, metadata, json_file, image_root)
    if prepare is not None:
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(_load_prepared, prepare, json_file, image_root, name))


def _load_prepared(prepare: Callable[[], object], json_file: str, image_root: str, name: str) -> List[dict]:
    prepare()
    return load_coco_json(json_file, image_root, name)


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> List[str]:
    """Check and register `(name, json_file, image_root)` triples (`tools/train_net.py --register-coco`).

    Each json is validated now (`validate_coco_json`: one-line errors, counts of the boxes training will clip or
    drop), before any model or data loader is built; detectron2's `load_coco_json` reads it when first used.
    """
    names = []
    for name, json_file, image_root in specs:
        if not os.path.isfile(json_file):
            raise MissingFileError(f"--register-coco {name}: annotation file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise MissingFileError(f"--register-coco {name}: image folder not found: {image_root}")
        report = validate_coco_json(json_file, image_root)
        register_coco_dataset(name, json_file, image_root, report.category_ids, report.thing_classes)
        logger.info(f"Registered COCO-format dataset {name!r} ({report.summary()}): {json_file}")
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
