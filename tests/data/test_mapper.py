import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from PIL import Image

from dab_detr.data import (
    DetrDatasetMapper,
    build_detr_crop_augmentation,
    build_detr_test_augmentation,
    build_detr_train_augmentation,
)

H, W = 60, 80
RED_BOX = (10, 15, 35, 40)  # xyxy, class 0
GREEN_BOX = (50, 5, 75, 30)  # xyxy, class 1


def _anno(xyxy, category_id=0, iscrowd=0):
    x0, y0, x1, y1 = xyxy
    return {
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category_id,
        "iscrowd": iscrowd,
    }


@pytest.fixture
def two_box_dict(tmp_path):
    """A black PNG (lossless) with a red and a green filled rectangle, and its dataset dict."""
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    pixels[RED_BOX[1] : RED_BOX[3], RED_BOX[0] : RED_BOX[2]] = (255, 0, 0)
    pixels[GREEN_BOX[1] : GREEN_BOX[3], GREEN_BOX[0] : GREEN_BOX[2]] = (0, 255, 0)
    path = str(tmp_path / "two_boxes.png")
    Image.fromarray(pixels).save(path)
    return {
        "file_name": path,
        "height": H,
        "width": W,
        "image_id": 1,
        "annotations": [_anno(RED_BOX, 0), _anno(GREEN_BOX, 1)],
    }


def _colour_bounds(image: torch.Tensor, channel: int):
    """xyxy pixel bounds of pixels dominated by `channel` in an RGB (3, H, W) image, or None."""
    img = image.numpy().astype(int)
    others = [c for c in range(3) if c != channel]
    mask = (img[channel] >= 128) & (img[others[0]] < 128) & (img[others[1]] < 128)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


def _check_boxes_follow_pixels(out, min_side=3.0):
    """Every output box lies on its colour's pixels (+-1.5 px); returns how many were compared."""
    compared = 0
    boxes = out["instances"].gt_boxes.tensor.numpy()
    classes = out["instances"].gt_classes.tolist()
    for cls, channel in ((0, 0), (1, 1)):
        pixel_box = _colour_bounds(out["image"], channel)
        if cls not in classes:
            # dropped by the crop: at most a sliver of its colour may remain
            assert pixel_box is None or min(pixel_box[2:] - pixel_box[:2]) <= 2
            continue
        box = boxes[classes.index(cls)]
        if min(box[2:] - box[:2]) < min_side:  # a sliver: thresholding is meaningless there
            continue
        assert pixel_box is not None
        np.testing.assert_allclose(box, pixel_box, atol=1.5)
        compared += 1
    return compared


def test_flip_moves_boxes_with_pixels(two_box_dict):
    mapper = DetrDatasetMapper([T.RandomFlip(prob=1.0)])
    out = mapper(two_box_dict)
    assert out["image"].shape == (3, H, W)
    assert _check_boxes_follow_pixels(out) == 2
    # and it really flipped: red box now at W - x1 .. W - x0
    red = out["instances"].gt_boxes.tensor[out["instances"].gt_classes == 0][0]
    assert red.tolist() == [W - RED_BOX[2], RED_BOX[1], W - RED_BOX[0], RED_BOX[3]]


def test_resize_scales_boxes_with_pixels(two_box_dict):
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(90, max_size=1000)])
    out = mapper(two_box_dict)
    assert out["image"].shape == (3, 90, 120)
    assert out["instances"].image_size == (90, 120)
    assert _check_boxes_follow_pixels(out) == 2


def test_crop_branch_keeps_boxes_on_pixels(two_box_dict):
    crop = build_detr_crop_augmentation(
        pre_crop_sizes=(60,), crop_size=(20, 50), min_sizes=(40, 90), max_size=1000
    )
    mapper = DetrDatasetMapper(crop)
    compared, cropped_away = 0, 0
    for seed in range(40):
        np.random.seed(seed)
        out = mapper(two_box_dict)
        assert out["instances"].image_size == tuple(out["image"].shape[1:])
        compared += _check_boxes_follow_pixels(out)
        cropped_away += 2 - len(out["instances"])
    # the seeds exercise both partial crops and boxes cropped away entirely
    assert compared >= 20 and cropped_away >= 5


def test_crop_branch_is_chosen_half_the_time_with_global_numpy_rng(two_box_dict):
    plain = [T.ResizeShortestEdge(100, max_size=1000)]
    with_crop = [T.RandomCrop("absolute", (30, 30)), T.ResizeShortestEdge(50, max_size=1000)]
    mapper = DetrDatasetMapper(plain, with_crop)

    def heights(seed):
        np.random.seed(seed)
        return [mapper(two_box_dict)["image"].shape[1] for _ in range(200)]

    first = heights(0)
    assert set(first) == {50, 100}
    assert 70 <= first.count(50) <= 130
    assert heights(0) == first  # reproducible from the seed
    assert heights(1) != first


def test_default_augmentations_are_detr_recipe():
    train = build_detr_train_augmentation()
    assert [type(a) for a in train] == [T.RandomFlip, T.ResizeShortestEdge]
    assert train[1].short_edge_length == tuple(range(480, 801, 32)) and train[1].max_size == 1333
    assert not train[1].is_range

    crop = build_detr_crop_augmentation()
    assert [type(a) for a in crop] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
        T.RandomCrop,
        T.ResizeShortestEdge,
    ]
    assert crop[1].short_edge_length == (400, 500, 600) and not crop[1].is_range
    assert crop[2].crop_type == "absolute_range" and crop[2].crop_size == (384, 600)
    assert crop[3].short_edge_length == tuple(range(480, 801, 32)) and crop[3].max_size == 1333

    (test,) = build_detr_test_augmentation()
    assert test.short_edge_length == (800, 800) and test.max_size == 1333

    small = build_detr_train_augmentation(min_sizes=(96, 128), max_size=200, random_flip="none")
    assert len(small) == 1 and small[0].short_edge_length == (96, 128) and small[0].max_size == 200
    with pytest.raises(ValueError, match="random_flip"):
        build_detr_train_augmentation(random_flip="diagonal")


def test_crowd_annotations_are_dropped(two_box_dict):
    two_box_dict["annotations"][1]["iscrowd"] = 1
    out = DetrDatasetMapper([])(two_box_dict)
    assert out["instances"].gt_classes.tolist() == [0]


def test_degenerate_and_outside_boxes_are_removed(two_box_dict):
    two_box_dict["annotations"] += [
        _anno((20, 20, 20, 30), 2),  # zero width
        _anno((20, 20, 30, 20), 2),  # zero height
        {
            "bbox": [30, 30, -5, 10],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 2,
        },  # negative width
        _anno((W + 5, 10, W + 20, 20), 2),  # fully right of the image
        _anno((10, -30, 20, -5), 2),  # fully above the image
    ]
    out = DetrDatasetMapper([T.RandomFlip(prob=1.0)])(two_box_dict)
    assert sorted(out["instances"].gt_classes.tolist()) == [0, 1]


def test_boxes_are_clipped_to_image(two_box_dict):
    two_box_dict["annotations"] = [_anno((-10, 50, 30, 90), 0)]
    out = DetrDatasetMapper([])(two_box_dict)
    assert out["instances"].gt_boxes.tensor.tolist() == [[0, 50, 30, H]]


@pytest.mark.parametrize("annotations", [[], None], ids=["empty_list", "no_key"])
def test_image_without_annotations_gives_empty_instances(two_box_dict, annotations):
    if annotations is None:
        del two_box_dict["annotations"]
    else:
        two_box_dict["annotations"] = annotations
    out = DetrDatasetMapper([T.ResizeShortestEdge(30, max_size=1000)])(two_box_dict)
    assert len(out["instances"]) == 0
    assert out["instances"].image_size == (30, 40)
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)
    assert out["instances"].gt_classes.dtype == torch.int64


def test_dataset_level_filter_empty_drops_images_without_usable_annotations(two_box_dict):
    """detectron2 (DATALOADER.FILTER_EMPTY_ANNOTATIONS, default True) removes images with no
    non-crowd annotation before the mapper sees them; DETR keeps them (filter_empty=False)."""
    empty = dict(two_box_dict, image_id=2, annotations=[])
    crowd_only = dict(two_box_dict, image_id=3, annotations=[_anno(RED_BOX, 0, iscrowd=1)])
    name = "test_dab_detr_filter_empty"
    DatasetCatalog.register(name, lambda: [two_box_dict, empty, crowd_only])
    MetadataCatalog.get(name).thing_classes = ["red", "green"]
    try:
        kept = get_detection_dataset_dicts(name, filter_empty=True)
        assert [d["image_id"] for d in kept] == [1]
        everything = get_detection_dataset_dicts(name, filter_empty=False)
        assert [d["image_id"] for d in everything] == [1, 2, 3]
        # the mapper turns both unfiltered ones into empty targets
        mapper = DetrDatasetMapper([])
        assert [len(mapper(d)["instances"]) for d in everything] == [2, 0, 0]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_test_mode_strips_annotations_and_keeps_original_size(two_box_dict):
    mapper = DetrDatasetMapper(build_detr_test_augmentation(90, 1000), is_train=False)
    out = mapper(two_box_dict)
    assert "annotations" not in out and "instances" not in out
    assert out["image"].shape == (3, 90, 120) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (H, W)
    assert "annotations" in two_box_dict  # the input dict is not modified


def test_image_format_sets_channel_order(two_box_dict):
    rgb = DetrDatasetMapper([], image_format="RGB")(two_box_dict)["image"]
    bgr = DetrDatasetMapper([], image_format="BGR")(two_box_dict)["image"]
    assert rgb[0, RED_BOX[1], RED_BOX[0]] == 255 and rgb[2, RED_BOX[1], RED_BOX[0]] == 0
    assert torch.equal(bgr, rgb.flip(0))


def test_image_size_mismatch_names_the_file(two_box_dict):
    two_box_dict["width"] = W + 1
    with pytest.raises(SizeMismatchError, match="two_boxes.png"):
        DetrDatasetMapper([])(two_box_dict)


def test_from_yacs_config(two_box_dict):
    cfg = get_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (40, 50)
    cfg.INPUT.MAX_SIZE_TRAIN = 500
    cfg.INPUT.MIN_SIZE_TEST = 45
    cfg.INPUT.CROP.ENABLED = False

    mapper = DetrDatasetMapper(cfg, is_train=True)
    assert mapper.augmentation_with_crop is None and mapper.image_format == "RGB"
    flip, resize = mapper.augmentation.augs
    assert (
        isinstance(flip, T.RandomFlip)
        and resize.short_edge_length == (40, 50)
        and resize.max_size == 500
    )

    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = [20, 30]
    augs = DetrDatasetMapper(cfg, is_train=True).augmentation_with_crop.augs
    assert [type(a) for a in augs] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
        T.RandomCrop,
        T.ResizeShortestEdge,
    ]
    assert augs[1].short_edge_length == (400, 500, 600) and augs[2].crop_size == (20, 30)
    assert augs[3].short_edge_length == (40, 50) and augs[3].max_size == 500

    test_mapper = DetrDatasetMapper(cfg, is_train=False)
    assert not test_mapper.is_train and test_mapper.augmentation_with_crop is None
    assert test_mapper(two_box_dict)["image"].shape == (3, 45, 60)


def test_lazy_config_instantiation(two_box_dict):
    cfg = L(DetrDatasetMapper)(
        augmentation=L(build_detr_train_augmentation)(min_sizes=(30,), max_size=100),
        augmentation_with_crop=None,
        is_train=True,
        image_format="RGB",
    )
    out = instantiate(cfg)(two_box_dict)
    assert out["image"].shape == (3, 30, 40) and len(out["instances"]) == 2


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_detectron2_does(tmp_path, orientation):
    from detectron2.data.detection_utils import read_image as d2_read_image

    from dab_detr.data.mapper import read_image

    pixels = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / "rotated.png")
    Image.fromarray(pixels).save(path, exif=exif)
    ours = read_image(path, "RGB")
    assert ours.shape == ((20, 12, 3) if orientation in (6, 8) else (12, 20, 3))
    np.testing.assert_array_equal(ours, d2_read_image(path, "RGB"))
