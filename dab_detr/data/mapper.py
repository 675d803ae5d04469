"""DETR's data pipeline as a detectron2 dataset mapper.

Training: random horizontal flip, then with probability 0.5 either a multi-scale resize, or a
resize -> random crop -> multi-scale resize (DETR's "RandomSelect"). Test: one fixed resize.
"""

import copy
import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = [
    "DETR_MIN_SIZES",
    "ImageReadError",
    "read_image",
    "build_detr_train_augmentation",
    "build_detr_crop_augmentation",
    "build_detr_test_augmentation",
    "DetrDatasetMapper",
]

logger = logging.getLogger(__name__)

DETR_MIN_SIZES = tuple(range(480, 801, 32))  # 480, 512, ..., 800


# PIL modes of 16/32-bit single-channel images (16-bit grayscale PNGs open as one of these). PIL's
# convert("RGB") clips their values at 255, which turns a 16-bit image almost entirely white.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(OSError):
    """An image file that exists but cannot be decoded (truncated, corrupt, not an image)."""


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says (what detectron2's `read_image` does)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: keep the pixels as stored, as detectron2 does
        return image


def read_image(file_name: str, format: Optional[str] = "RGB") -> np.ndarray:
    """detectron2's `read_image` (EXIF orientation applied; grayscale, palette, RGBA, CMYK converted to
    `format`), except that 16-bit single-channel images are scaled to 0-255 instead of clipped.

    Returns an (H, W, C) uint8 array. A missing or unreadable file raises an OSError naming it.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image = _upright(image)
            if image.mode in _WIDE_INT_MODES:
                # 65535 -> 255; values above 16 bits (mode "I" holds int32) saturate
                pixels = np.asarray(image, dtype=np.float64) / 257.0
                image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))  # mode "L"
            return utils.convert_PIL_to_numpy(image, format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{file_name}: image file not found") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated/corrupt files with these types
        raise ImageReadError(f"{file_name}: cannot read the image ({type(e).__name__}: {e})") from e


def _flip(random_flip: str) -> List[T.Augmentation]:
    if random_flip not in ("horizontal", "vertical", "none"):
        raise ValueError(
            f"random_flip={random_flip!r}: expected 'horizontal', 'vertical' or 'none'"
        )
    if random_flip == "none":
        return []
    return [
        T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical")
    ]


def build_detr_train_augmentation(
    min_sizes: Sequence[int] = DETR_MIN_SIZES, max_size: int = 1333, random_flip: str = "horizontal"
) -> List[T.Augmentation]:
    """Flip, then resize the shorter side to one of `min_sizes` (longer side <= `max_size`)."""
    return _flip(random_flip) + [
        T.ResizeShortestEdge(tuple(min_sizes), max_size, sample_style="choice")
    ]


def build_detr_crop_augmentation(
    pre_crop_sizes: Sequence[int] = (400, 500, 600),
    crop_size: Tuple[int, int] = (384, 600),
    min_sizes: Sequence[int] = DETR_MIN_SIZES,
    max_size: int = 1333,
    random_flip: str = "horizontal",
) -> List[T.Augmentation]:
    """Flip, resize the shorter side to one of `pre_crop_sizes`, crop a random region whose
    height and width are each drawn from `crop_size` = (min, max) pixels, then resize as in
    :func:`build_detr_train_augmentation`."""
    return _flip(random_flip) + [
        T.ResizeShortestEdge(tuple(pre_crop_sizes), sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(crop_size)),
        T.ResizeShortestEdge(tuple(min_sizes), max_size, sample_style="choice"),
    ]


def build_detr_test_augmentation(min_size: int = 800, max_size: int = 1333) -> List[T.Augmentation]:
    return [T.ResizeShortestEdge(min_size, max_size)]


class DetrDatasetMapper:
    """Map a detectron2 dataset dict to the model's input.

    Output: ``{"image": uint8 (3, H, W) in `image_format`, "height", "width": original size,
    "instances": Instances(gt_boxes=abs xyxy in the augmented image, gt_classes=int64)}``;
    ``instances`` only when `is_train` (possibly empty: DETR trains on images without objects),
    and at test time the annotations are removed.
    """

    @configurable
    def __init__(
        self,
        augmentation: List[T.Augmentation],
        augmentation_with_crop: Optional[List[T.Augmentation]] = None,
        is_train: bool = True,
        image_format: str = "RGB",
        skip_unreadable: bool = True,
    ):
        """
        Args:
            augmentation: applied to every image, or (when `augmentation_with_crop` is given)
                to half of them.
            augmentation_with_crop: applied to the other half (training only in DETR).
            is_train: keep annotations and build ``instances``.
            image_format: any format of :func:`detectron2.data.detection_utils.read_image`.
            skip_unreadable: in training, return None for an image file that is missing or cannot be
                decoded (detectron2's data loaders then use another image), with a warning naming it.
                At test time such a file is always an error: skipping it would change the metrics.
        """
        self.augmentation = T.AugmentationList(augmentation)
        self.augmentation_with_crop = (
            None if augmentation_with_crop is None else T.AugmentationList(augmentation_with_crop)
        )
        self.is_train = is_train
        self.image_format = image_format
        self.skip_unreadable = skip_unreadable
        self._num_skipped = 0
        mode = "training" if is_train else "inference"
        logger.info(
            f"[DetrDatasetMapper] {mode}: {augmentation}"
            + (
                ""
                if augmentation_with_crop is None
                else f", or with p=0.5: {augmentation_with_crop}"
            )
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        """Read yacs ``cfg.INPUT`` like detectron2's DatasetMapper. The crop branch is used when
        ``INPUT.CROP.ENABLED`` (DETR: TYPE "absolute_range", SIZE (384, 600)); its pre-crop
        shorter sides come from ``INPUT.CROP.PRE_CROP_SIZES`` when present, else DETR's
        (400, 500, 600)."""
        inp = cfg.INPUT
        if not is_train:
            return {
                "augmentation": build_detr_test_augmentation(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST),
                "augmentation_with_crop": None,
                "is_train": False,
                "image_format": inp.FORMAT,
            }
        resize = T.ResizeShortestEdge(
            tuple(inp.MIN_SIZE_TRAIN), inp.MAX_SIZE_TRAIN, sample_style=inp.MIN_SIZE_TRAIN_SAMPLING
        )
        flip = _flip(inp.RANDOM_FLIP)
        with_crop = None
        if inp.CROP.ENABLED:
            pre_crop_sizes = tuple(inp.CROP.get("PRE_CROP_SIZES", (400, 500, 600)))
            with_crop = flip + [
                T.ResizeShortestEdge(pre_crop_sizes, sample_style="choice"),
                T.RandomCrop(inp.CROP.TYPE, tuple(inp.CROP.SIZE)),
                resize,
            ]
        return {
            "augmentation": flip + [resize],
            "augmentation_with_crop": with_crop,
            "is_train": True,
            "image_format": inp.FORMAT,
        }

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        dataset_dict = copy.deepcopy(dataset_dict)  # the catalog's dicts are reused every epoch
        try:
            image = read_image(dataset_dict["file_name"], format=self.image_format)
        except OSError as e:
            if not (self.is_train and self.skip_unreadable):
                raise
            self._num_skipped += 1
            logger.warning(
                f"Skipping an unreadable training image: {e} "
                f"({self._num_skipped} skipped so far by this data-loading process)"
            )
            return None
        self._check_image_size(dataset_dict, image)

        augmentation = self.augmentation
        # the global numpy RNG, which detectron2 seeds per worker, keeps runs reproducible
        if self.augmentation_with_crop is not None and np.random.rand() < 0.5:
            augmentation = self.augmentation_with_crop
        aug_input = T.AugInput(image)
        transforms = augmentation(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (H, W)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train:
            return dataset_dict
        dataset_dict["instances"] = self._transform_annotations(
            annotations or [], transforms, image_shape
        )
        return dataset_dict

    @staticmethod
    def _check_image_size(dataset_dict: dict, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        expected = (dataset_dict.get("width", w), dataset_dict.get("height", h))
        if (w, h) != expected:
            raise utils.SizeMismatchError(
                f"{dataset_dict.get('file_name', '<image>')}: the image is {w}x{h} (width x height) but its "
                f"dataset entry (image_id={dataset_dict.get('image_id')!r}) says width={expected[0]}, "
                f"height={expected[1]}. Fix 'width'/'height' in the annotation file, or the image."
            )
        dataset_dict.setdefault("width", w)
        dataset_dict.setdefault("height", h)

    @staticmethod
    def _transform_annotations(annotations: List[dict], transforms, image_shape: Tuple[int, int]):
        annos = []
        for obj in annotations:
            if obj.get("iscrowd", 0) != 0:
                continue
            x0, y0, x1, y1 = utils.get_bbox(obj)
            # a box with non-positive size would come back as a valid one from apply_box (which
            # takes min/max of the corners), so drop it before transforming
            if not (x1 > x0 and y1 > y0):
                continue
            obj = {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")}
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
        # transform_instance_annotations clips to the image; boxes cropped away become empty
        instances = utils.annotations_to_instances(annos, image_shape)
        return utils.filter_empty_instances(instances)
