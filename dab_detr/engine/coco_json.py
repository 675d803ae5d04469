"""A checked COCO-json loader for `--register-coco` datasets.

It returns what detectron2's `load_coco_json` returns for a detection dataset (records sorted by image id,
annotations in file order, contiguous category ids, `BoxMode.XYWH_ABS`), but

- a malformed file, a missing field or a category id absent from `categories` is an error naming the json and the
  image / annotation (detectron2 raises a bare KeyError or AssertionError, or crashes later in training);
- every listed image file must exist (checked now, not hours into training);
- boxes that cannot be trained on are dropped, boxes reaching outside their image are clipped to it, and both are
  counted in one log line (detectron2 keeps them: a negative width silently becomes a positive one in the mapper).
Segmentations and keypoints are not loaded: DAB-DETR only uses boxes.
"""
import json
import logging
import math
import os
from collections import Counter
from numbers import Real
from typing import Dict, List, Optional

from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

from .errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["read_coco_json", "coco_category_names", "load_coco_detection_json"]


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


def coco_category_names(json_file: str, data: Optional[dict] = None) -> List[str]:
    """Category names ordered by id (the order of detectron2's contiguous class ids)."""
    data = read_coco_json(json_file) if data is None else data
    return [c["name"] for c in _categories(data, json_file)]


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


def _annotation_where(json_file: str, i: int, ann) -> str:
    ann_id = ann.get("id") if isinstance(ann, dict) else None
    return f"{json_file}: annotation id={ann_id!r} (annotations[{i}])"


def load_coco_detection_json(
    json_file: str, image_root: str, dataset_name: Optional[str] = None, check_files: bool = True
) -> List[dict]:
    """Load a COCO-format detection json as detectron2 dataset dicts; see the module docstring.

    Args:
        json_file: the annotation file.
        image_root: folder the images' `file_name`s are relative to.
        dataset_name: when given, `thing_classes` and `thing_dataset_id_to_contiguous_id` are set in its metadata.
        check_files: require every image file to exist now (local paths only).
    """
    data = read_coco_json(json_file)
    categories = _categories(data, json_file)
    id_map = {c["id"]: i for i, c in enumerate(categories)}
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.thing_classes = [c["name"] for c in categories]
        meta.thing_dataset_id_to_contiguous_id = id_map

    images: Dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        _check_image(img, i, json_file)
        if img["id"] in images:
            raise DatasetError(f"{json_file}: image id {img['id']} appears twice in 'images'")
        images[img["id"]] = img

    annotations: Dict[int, List[dict]] = {image_id: [] for image_id in images}
    counts: Counter = Counter()
    ann_ids = set()
    for i, ann in enumerate(data.get("annotations", [])):
        where = _annotation_where(json_file, i, ann)
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: not an object: {ann!r}")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise DatasetError(f"{where}: missing '{key}'")
        if ann["id"] in ann_ids:
            raise DatasetError(f"{where}: annotation id {ann['id']!r} appears twice")
        ann_ids.add(ann["id"])
        if ann["category_id"] not in id_map:
            raise DatasetError(
                f"{where}: category_id={ann['category_id']!r} is not in 'categories' (ids {sorted(id_map)})"
            )
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in bbox)
        ):
            raise DatasetError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
        if ann["image_id"] not in images:
            counts["refer to no image in 'images'"] += 1
            continue
        img = images[ann["image_id"]]
        box = _checked_box([float(v) for v in bbox], img["width"], img["height"], counts)
        if box is None:
            continue
        obj = {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": id_map[ann["category_id"]]}
        if "iscrowd" in ann:
            obj["iscrowd"] = ann["iscrowd"]
        annotations[ann["image_id"]].append(obj)

    if check_files:
        _check_files_exist(json_file, image_root, [images[k] for k in sorted(images)])
    records = [
        {
            "file_name": os.path.join(image_root, images[image_id]["file_name"]),
            "height": images[image_id]["height"],
            "width": images[image_id]["width"],
            "image_id": image_id,
            "annotations": annotations[image_id],
        }
        for image_id in sorted(images)
    ]
    kept = sum(len(r["annotations"]) for r in records)
    logger.info(f"Loaded {len(records)} images and {kept} boxes in COCO format from {json_file}")
    if counts:
        details = "; ".join(f"{n} {what}" for what, n in sorted(counts.items()))
        logger.warning(f"{json_file}: of {len(data.get('annotations', []))} annotations: {details}")
    return records


def _checked_box(box: List[float], width: int, height: int, counts: Counter) -> Optional[List[float]]:
    """`box` (x, y, w, h) clipped to the image, or None (counted in `counts`) when nothing trainable is left."""
    if not all(math.isfinite(v) for v in box):
        counts["dropped: non-finite bbox"] += 1
        return None
    x0, y0, w, h = box
    if w <= 0 or h <= 0:
        counts["dropped: zero or negative width/height"] += 1
        return None
    x1, y1 = x0 + w, y0 + h
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if cx1 <= cx0 or cy1 <= cy0:
        counts["dropped: entirely outside the image"] += 1
        return None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        counts["clipped to the image"] += 1
        return [cx0, cy0, cx1 - cx0, cy1 - cy0]
    return box


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
