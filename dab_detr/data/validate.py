"""Checks of a COCO-format detection dataset, run before training (`tools/train_net.py --register-coco`) or alone
(`python tools/check_dataset.py JSON IMAGE_ROOT`).

detectron2's `load_coco_json` trusts its input: a missing field or an unknown category id is a bare KeyError or
AssertionError, a missing image file an error hours into training. Here each problem is a `DatasetError` whose one
line names the json and the image / annotation. Boxes are not changed: the dataset mapper clips them to the
(augmented) image and drops empty ones with detectron2's transforms; the validator counts, in one log line, the
boxes that will be clipped or dropped.
"""
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from numbers import Real
from typing import Dict, List

from ..errors import DatasetError

__all__ = ["DatasetReport", "read_coco_json", "coco_category_names", "validate_coco_json"]

logger = logging.getLogger(__name__)


@dataclass
class DatasetReport:
    """What `validate_coco_json` found: sizes, and the boxes training will clip or drop, by reason."""

    num_images: int
    num_annotations: int
    category_ids: List[int]
    thing_classes: List[str]
    box_counts: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = (f"{self.num_images} images, {self.num_annotations} annotations, "
                f"{len(self.thing_classes)} categories")
        if self.box_counts:
            text += "; of the annotations: " + "; ".join(f"{n} {what}" for what, n in sorted(self.box_counts.items()))
        return text


def read_coco_json(json_file: str) -> dict:
    """Parse `json_file` and check its top level; errors name the file and the position."""
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DatasetError(f"{json_file}: annotation file not found") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{json_file}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_file}: no '{key}' list (a COCO-format json needs one)")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{json_file}: 'annotations' must be a list")
    if not data["categories"]:
        raise DatasetError(f"{json_file}: 'categories' is empty")
    return data


def _categories(data: dict, json_file: str) -> List[dict]:
    seen = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{json_file}: categories[{i}] needs an integer 'id' and a string 'name', got {c!r}")
        if c["id"] in seen:
            raise DatasetError(f"{json_file}: category id {c['id']} appears twice in 'categories'")
        seen.add(c["id"])
    return sorted(data["categories"], key=lambda c: c["id"])


def coco_category_names(json_file: str) -> List[str]:
    """Category names ordered by id: detectron2's `thing_classes` (contiguous ids in this order)."""
    return [c["name"] for c in _categories(read_coco_json(json_file), json_file)]


def _check_image(img, i: int, json_file: str) -> None:
    if not isinstance(img, dict):
        raise DatasetError(f"{json_file}: images[{i}] is not an object: {img!r}")
    where = f"{json_file}: images[{i}] (id={img.get('id')!r})"
    if not isinstance(img.get("id"), int):
        raise DatasetError(f"{where}: 'id' must be an integer")
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        raise DatasetError(f"{where}: missing 'file_name'")
    for key in ("width", "height"):
        value = img.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DatasetError(f"{where}: '{key}' must be a positive integer, got {value!r}")


def _check_annotation(ann, i: int, json_file: str, category_ids, ann_ids: set) -> None:
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    where = f"{json_file}: annotation id={ann_id!r} (annotations[{i}])"
    if not isinstance(ann, dict):
        raise DatasetError(f"{where}: not an object: {ann!r}")
    for key in ("id", "image_id", "category_id", "bbox"):
        if key not in ann:
            raise DatasetError(f"{where}: missing '{key}'")
    if ann["id"] in ann_ids:
        raise DatasetError(f"{where}: annotation id {ann['id']!r} appears twice")
    ann_ids.add(ann["id"])
    if ann["category_id"] not in category_ids:
        raise DatasetError(
            f"{where}: category_id={ann['category_id']!r} is not in 'categories' (ids {sorted(category_ids)})"
        )
    bbox = ann["bbox"]
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in bbox)
    ):
        raise DatasetError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")


def _box_fate(box: List[float], width: int, height: int) -> str:
    """What the mapper will do with an `(x, y, w, h)` box of a `width` x `height` image ("" = keep it as is)."""
    if not all(math.isfinite(v) for v in box):
        return "dropped: non-finite bbox"
    x0, y0, w, h = box
    if w <= 0 or h <= 0:
        return "dropped: zero or negative width/height"
    x1, y1 = x0 + w, y0 + h
    if min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0):
        return "dropped: entirely outside the image"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return "clipped to the image"
    return ""


def validate_coco_json(json_file: str, image_root: str, check_files: bool = True) -> DatasetReport:
    """Check a COCO-format detection json (and, if `check_files`, that its local image files exist).

    Raises a `DatasetError` naming the json and the entry at the first problem; logs one warning with the number
    of boxes training will clip or drop. Segmentations and keypoints are not checked: DAB-DETR only uses boxes.
    """
    data = read_coco_json(json_file)
    categories = _categories(data, json_file)
    images: Dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        _check_image(img, i, json_file)
        if img["id"] in images:
            raise DatasetError(f"{json_file}: image id {img['id']} appears twice in 'images'")
        images[img["id"]] = img
    category_ids = {c["id"] for c in categories}
    counts: Counter = Counter()
    ann_ids: set = set()
    annotations = data.get("annotations", [])
    for i, ann in enumerate(annotations):
        _check_annotation(ann, i, json_file, category_ids, ann_ids)
        img = images.get(ann["image_id"])
        fate = "refer to no image in 'images'" if img is None else _box_fate(
            [float(v) for v in ann["bbox"]], img["width"], img["height"])
        if fate:
            counts[fate] += 1
    if check_files:
        _check_files_exist(json_file, image_root, [images[k] for k in sorted(images)])
    report = DatasetReport(
        len(images), len(annotations), [c["id"] for c in categories], [c["name"] for c in categories], dict(counts)
    )
    if counts:
        logger.warning(f"{json_file}: {report.summary()}")
    return report


def _check_files_exist(json_file: str, image_root: str, images: List[dict]) -> None:
    if "://" in image_root:  # remote storage: checking each file would be slow; the mapper reports it
        return
    missing = [img for img in images if not os.path.isfile(os.path.join(image_root, img["file_name"]))]
    if missing:
        first = missing[0]
        raise DatasetError(
            f"{json_file}: {len(missing)} of {len(images)} image files are missing under {image_root}, "
            f"e.g. image id={first['id']}: {os.path.join(image_root, first['file_name'])}"
        )
