"""The embedded default dataset: seeded synthetic shapes in COCO format, cached outside git.

Each image is a noisy colour gradient with thin distractor strokes (not objects) and 1-6 filled
shapes (ellipse, rectangle, triangle, cross, ring) whose boxes are the tight bounds of their
visible pixels. The files are generated on first use into
``$DAB_DETR_CACHE/synthetic_v<version>_<hash of the parameters>/`` (default cache
``~/.cache/dab_detr``) and registered with detectron2 like any COCO json dataset:

    register_synthetic_dataset()              # dab_synthetic_train, dab_synthetic_val
    register_synthetic_dataset(num_train=500, color_mode="random")
"""

import colorsys
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from dab_detr.modeling.box_ops import box_iou

__all__ = [
    "SHAPE_NAMES",
    "SYNTHETIC_VERSION",
    "SyntheticParams",
    "synthetic_dataset_dir",
    "generate_synthetic_dataset",
    "register_synthetic_dataset",
]

logger = logging.getLogger(__name__)

# Bump whenever the drawing code changes what a given set of parameters produces: the cache
# folder name includes it, so stale caches are never reused.
SYNTHETIC_VERSION = 2
SHAPE_NAMES = ("ellipse", "rectangle", "triangle", "cross", "ring")
SPLITS = ("train", "val")
COLOR_MODES = ("class_hue", "random")


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines the generated files (their hash names the cache folder)."""

    num_train: int = 3000
    num_val: int = 300
    image_size: int = 128
    num_classes: int = 5  # the first `num_classes` of SHAPE_NAMES
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 0.08  # sqrt(w * h) of a shape as a fraction of the image side
    max_size: float = 0.5
    min_aspect: float = 0.5  # w / h, sampled log-uniformly
    max_aspect: float = 2.0
    max_iou: float = 0.3  # between the (visible) boxes of any two shapes
    min_visible: float = 0.75  # fraction of each shape's pixels left visible by later shapes
    min_distractors: int = 2
    max_distractors: int = 8
    noise_std: float = 8.0  # std of the pixel noise, 0-255 scale
    color_mode: str = "class_hue"  # "class_hue": one hue band per class; "random": shape only
    hue_jitter: float = 0.04  # half-width of each class's hue band (hue in [0, 1))
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self):
        def check(ok, field, rule):
            if not ok:
                raise ValueError(f"SyntheticParams.{field}={getattr(self, field)!r}: {rule}")

        check(self.num_train >= 0, "num_train", "must be >= 0")
        check(self.num_val >= 0, "num_val", "must be >= 0")
        check(self.image_size >= 16, "image_size", "must be >= 16")
        check(
            1 <= self.num_classes <= len(SHAPE_NAMES),
            "num_classes",
            f"must be in 1..{len(SHAPE_NAMES)}",
        )
        check(self.min_objects >= 0, "min_objects", "must be >= 0")
        check(self.max_objects >= self.min_objects, "max_objects", "must be >= min_objects")
        check(0 < self.min_size <= self.max_size, "min_size", "need 0 < min_size <= max_size")
        check(self.max_size <= 1.0, "max_size", "must be <= 1")
        check(
            0 < self.min_aspect <= self.max_aspect,
            "min_aspect",
            "need 0 < min_aspect <= max_aspect",
        )
        check(0 <= self.max_iou <= 1, "max_iou", "must be in [0, 1]")
        check(
            0 < self.min_visible <= 1,
            "min_visible",
            "must be in (0, 1]: every shape keeps some pixels",
        )
        check(
            0 <= self.min_distractors <= self.max_distractors,
            "max_distractors",
            "need 0 <= min_distractors <= max_distractors",
        )
        check(self.noise_std >= 0, "noise_std", "must be >= 0")
        check(self.color_mode in COLOR_MODES, "color_mode", f"must be one of {COLOR_MODES}")
        check(0 <= self.hue_jitter <= 0.5, "hue_jitter", "must be in [0, 0.5]")
        check(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in 1..100")

    @property
    def thing_classes(self) -> List[str]:
        return list(SHAPE_NAMES[: self.num_classes])

    def short_hash(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(f"v{SYNTHETIC_VERSION}:{text}".encode()).hexdigest()[:10]


def _default_root() -> str:
    return os.path.expanduser(os.environ.get("DAB_DETR_CACHE", "~/.cache/dab_detr"))


def synthetic_dataset_dir(params: SyntheticParams, root: Optional[str] = None) -> str:
    """The cache folder for `params` (it may not exist yet)."""
    # absolute, so the registered json_file / image_root survive a change of directory
    root = os.path.abspath(_default_root() if root is None else os.path.expanduser(root))
    return os.path.join(root, f"synthetic_v{SYNTHETIC_VERSION}_{params.short_hash()}")


# ---------------------------------------------------------------------------------------------
# Drawing


def _shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A filled shape touching all four sides of a (h, w) canvas, as a bool mask."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "ellipse":
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
    elif shape == "rectangle":
        draw.rectangle([0, 0, w - 1, h - 1], fill=1)
    elif shape == "triangle":
        # apex on one side at a random position, base along the opposite side
        t = rng.uniform(0.0, 1.0)
        side = rng.integers(4)
        ax, ay = t * (w - 1), t * (h - 1)
        points = [
            [(ax, 0), (0, h - 1), (w - 1, h - 1)],
            [(ax, h - 1), (0, 0), (w - 1, 0)],
            [(0, ay), (w - 1, 0), (w - 1, h - 1)],
            [(w - 1, ay), (0, 0), (0, h - 1)],
        ][side]
        draw.polygon(points, fill=1)
    elif shape == "cross":
        # arms at least 2 px thick so small crosses are not mistaken for distractor strokes
        tw = max(2.0, rng.uniform(0.25, 0.4) * w)
        th = max(2.0, rng.uniform(0.25, 0.4) * h)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        draw.rectangle([cx - tw / 2, 0, cx + tw / 2, h - 1], fill=1)
        draw.rectangle([0, cy - th / 2, w - 1, cy + th / 2], fill=1)
    elif shape == "ring":
        t = max(2.0, rng.uniform(0.18, 0.3) * min(w, h))
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
        if w - 1 - 2 * t > 0 and h - 1 - 2 * t > 0:
            draw.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_NAMES}")
    return np.asarray(canvas, dtype=bool)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _iou_with(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box (4,) with each of `boxes` (n, 4), as (n,)."""
    iou, _ = box_iou(torch.from_numpy(box[None]), torch.from_numpy(boxes))
    return iou[0].numpy()


def _draw_background(p: SyntheticParams, rng: np.random.Generator) -> Image.Image:
    s = p.image_size
    # dull colours (low saturation) so the gradient never looks like an object
    c0 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.8))
    c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.8))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (
        np.cos(angle) * np.arange(s, dtype=np.float32)[None, :]
        + np.sin(angle) * np.arange(s, dtype=np.float32)[:, None]
    )
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    image = Image.fromarray((c0 + (c1 - c0) * ramp[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(p.min_distractors, p.max_distractors + 1)):
        color = tuple(
            int(c) for c in _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
        )
        width = int(rng.integers(1, 3))
        if rng.uniform() < 0.5:  # a polyline of 2-4 points
            points = [
                tuple(xy) for xy in rng.uniform(-0.1 * s, 1.1 * s, size=(rng.integers(2, 5), 2))
            ]
            draw.line(points, fill=color, width=width)
        else:  # an open arc
            x0, y0 = rng.uniform(-0.1 * s, 0.9 * s, size=2)
            d = rng.uniform(0.1 * s, 0.6 * s, size=2)
            start = rng.uniform(0, 360)
            draw.arc(
                [x0, y0, x0 + d[0], y0 + d[1]],
                start,
                start + rng.uniform(60, 270),
                fill=color,
                width=width,
            )
    return image


def _tight_box(mask: np.ndarray, x0: int = 0, y0: int = 0) -> np.ndarray:
    """xyxy bounds of the True pixels of a (h, w) mask whose top-left pixel is (x0, y0);
    pixel (x, y) covers [x, x + 1) x [y, y + 1)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return np.array(
        [x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.float32
    )


def _try_place(
    p: SyntheticParams,
    rng: np.random.Generator,
    cls: int,
    owner: np.ndarray,
    boxes: list,
    full_areas: list,
):
    """Sample a shape of class `cls` on top of those in `owner` (H, W) (0 = background, i + 1 =
    shape i). Return its top-left corner, its (h, w) mask and every shape's visible box
    afterwards, or None if the visible boxes would overlap by more than `max_iou` or an earlier
    shape would keep less than `min_visible` of its pixels."""
    s = p.image_size
    size = rng.uniform(p.min_size, p.max_size) * s
    aspect = np.exp(rng.uniform(np.log(p.min_aspect), np.log(p.max_aspect)))
    w = int(round(min(max(size * np.sqrt(aspect), 4), s)))
    h = int(round(min(max(size / np.sqrt(aspect), 4), s)))
    x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
    mask = _shape_mask(SHAPE_NAMES[cls], w, h, rng)
    new_boxes = list(boxes) + [_tight_box(mask, x0, y0)]
    if boxes and _iou_with(new_boxes[-1], np.stack(boxes)).max() > p.max_iou:
        return None
    under = owner[y0 : y0 + h, x0 : x0 + w][mask]
    covered = np.bincount(under, minlength=len(boxes) + 1)[1:]  # pixels each one would lose
    if not covered.any():
        return x0, y0, mask, new_boxes
    visible = np.bincount(owner.ravel(), minlength=len(boxes) + 1)[1:]
    if np.any(visible - covered < p.min_visible * np.asarray(full_areas)):
        return None
    # a partly covered shape's visible box shrinks, which can raise its IoU with a third shape
    placed = np.zeros_like(owner, dtype=bool)
    placed[y0 : y0 + h, x0 : x0 + w] = mask
    for j in np.nonzero(covered)[0]:
        bx0, by0, bx1, by1 = (int(v) for v in boxes[j])
        region = (slice(by0, by1), slice(bx0, bx1))
        new_boxes[j] = _tight_box((owner[region] == j + 1) & ~placed[region], bx0, by0)
        iou = _iou_with(new_boxes[j], np.stack(new_boxes))
        iou[j] = 0
        if iou.max() > p.max_iou:
            return None
    return x0, y0, mask, new_boxes


def _draw_image(p: SyntheticParams, rng: np.random.Generator) -> Tuple[np.ndarray, list]:
    """One image (H, W, 3) uint8 and its annotations [(class index, xyxy box, visible area)]."""
    s = p.image_size
    image = np.asarray(_draw_background(p, rng), dtype=np.float32).copy()
    owner = np.zeros((s, s), dtype=np.int16)
    boxes, classes, full_areas = [], [], []
    for _ in range(rng.integers(p.min_objects, p.max_objects + 1)):
        cls = int(rng.integers(p.num_classes))  # drawn once, so classes stay balanced
        for _attempt in range(30):
            placement = _try_place(p, rng, cls, owner, boxes, full_areas)
            if placement is not None:
                break
        else:
            continue  # no room for this shape: the image gets fewer
        x0, y0, mask, boxes = placement
        window = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
        if p.color_mode == "class_hue":
            hue = cls / p.num_classes + rng.uniform(-p.hue_jitter, p.hue_jitter)
        else:
            hue = rng.uniform()
        image[window][mask] = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
        owner[window][mask] = len(classes) + 1
        classes.append(cls)
        full_areas.append(int(mask.sum()))
    if p.noise_std > 0:
        # triangular noise (sum of two uniforms) with std `noise_std`: 4x cheaper than Gaussian
        u = rng.random((2, s, s, 3), dtype=np.float32)
        image += (u[0] + u[1] - 1.0) * np.float32(p.noise_std * np.sqrt(6.0))
    image = np.clip(image, 0, 255).astype(np.uint8)
    visible_areas = np.bincount(owner.ravel(), minlength=len(classes) + 1)[1:]
    annotations = [
        (cls, tuple(int(v) for v in box), int(area))
        for cls, box, area in zip(classes, boxes, visible_areas)
    ]
    return image, annotations


def _write_split(p: SyntheticParams, split: str, num_images: int, out_dir: str) -> dict:
    os.makedirs(os.path.join(out_dir, split))
    images, annotations = [], []
    for index in range(num_images):
        # one generator per image: any image can be regenerated alone, splits never share streams
        rng = np.random.default_rng([p.seed, SPLITS.index(split), index])
        pixels, annos = _draw_image(p, rng)
        file_name = f"{index:06d}.jpg"
        Image.fromarray(pixels).save(
            os.path.join(out_dir, split, file_name), "JPEG", quality=p.jpeg_quality, subsampling=0
        )
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": p.image_size, "height": p.image_size}
        )
        for cls, (x0, y0, x1, y1), area in annos:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {
            "description": f"dab_detr synthetic shapes v{SYNTHETIC_VERSION}",
            "params": dataclasses.asdict(p),
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(p.thing_classes)
        ],
    }


def generate_synthetic_dataset(
    params: Optional[SyntheticParams] = None, root: Optional[str] = None
) -> str:
    """Generate the dataset for `params` unless it is cached; return its folder.

    The files are written into a private temporary folder next to the final one and moved into
    place with one `os.rename`, so readers never see a partial dataset and processes that race
    (e.g. distributed ranks) all end up using whichever copy landed first.
    """
    params = SyntheticParams() if params is None else params
    final_dir = synthetic_dataset_dir(params, root)
    if os.path.isdir(final_dir):
        return final_dir
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp-", dir=parent)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        os.makedirs(os.path.join(tmp_dir, "annotations"))
        for split, num_images in zip(SPLITS, (params.num_train, params.num_val)):
            coco = _write_split(params, split, num_images, tmp_dir)
            with open(os.path.join(tmp_dir, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f)
        try:
            os.rename(tmp_dir, final_dir)
            logger.info(f"Generated the synthetic dataset in {final_dir}")
        except OSError:
            if not os.path.isdir(final_dir):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


# ---------------------------------------------------------------------------------------------
# detectron2 registration


def register_synthetic_dataset(
    root: Optional[str] = None, name_prefix: str = "dab_synthetic", **params
) -> Tuple[str, str]:
    """Register `<name_prefix>_train` and `<name_prefix>_val` as COCO-format detectron2 datasets.

    Args:
        root: cache folder; default ``$DAB_DETR_CACHE`` or ``~/.cache/dab_detr``.
        name_prefix: prefix of the two dataset names.
        params: fields of :class:`SyntheticParams` (an unknown name is a TypeError).

    The metadata (``json_file``, ``image_root``, ``evaluator_type="coco"``, ``thing_classes``) is
    set now; the files are generated the first time a split is loaded
    (``DatasetCatalog.get`` / building a data loader), so build the data loader before a
    ``COCOEvaluator`` that reads ``json_file``. Calling again with the same arguments does nothing;
    with different ones it replaces the registration.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .coco import register_coco_dataset

    params = SyntheticParams(**params)
    folder = synthetic_dataset_dir(params, root)
    names = (f"{name_prefix}_train", f"{name_prefix}_val")
    for split, name in zip(SPLITS, names):
        json_file = os.path.join(folder, "annotations", f"instances_{split}.json")
        image_root = os.path.join(folder, split)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            logger.warning(f"Re-registering dataset {name!r} with new parameters ({json_file})")
        register_coco_dataset(
            name, json_file, image_root, range(1, params.num_classes + 1), params.thing_classes,
            prepare=functools.partial(generate_synthetic_dataset, params, root),
        )
    return names
