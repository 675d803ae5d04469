import colorsys
import contextlib
import io
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image
from pycocotools.coco import COCO

from dab_detr.data import DetrDatasetMapper, SyntheticParams, build_detr_test_augmentation
from dab_detr.data import generate_synthetic_dataset, register_synthetic_dataset
from dab_detr.data import synthetic
from dab_detr.modeling.box_ops import box_iou

TINY = dict(num_train=12, num_val=6, image_size=96)


def _files(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _coco(json_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(json_file)


@pytest.fixture
def tiny_dir(tmp_path):
    return generate_synthetic_dataset(SyntheticParams(**TINY), root=str(tmp_path))


@pytest.fixture
def clean_catalog():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_same_seed_gives_identical_files(tmp_path, tiny_dir):
    again = generate_synthetic_dataset(SyntheticParams(**TINY), root=str(tmp_path / "other"))
    a, b = _files(tiny_dir), _files(again)
    assert len(a) == 12 + 6 + 2
    assert a == b


def test_different_seed_gives_different_files(tmp_path, tiny_dir):
    other = generate_synthetic_dataset(SyntheticParams(seed=1, **TINY), root=str(tmp_path))
    assert other != tiny_dir
    a, b = _files(tiny_dir), _files(other)
    assert a.keys() == b.keys()
    assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]
    assert all(a[k] != b[k] for k in a if k.endswith(".jpg"))


def test_train_and_val_images_differ(tiny_dir):
    files = _files(tiny_dir)
    assert files["train/000000.jpg"] != files["val/000000.jpg"]


@pytest.mark.parametrize("split,num_images", [("train", 12), ("val", 6)])
def test_json_is_valid_coco_with_boxes_inside_images(tiny_dir, split, num_images):
    coco = _coco(os.path.join(tiny_dir, "annotations", f"instances_{split}.json"))
    assert len(coco.getImgIds()) == num_images
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == list(enumerate(synthetic.SHAPE_NAMES, start=1))
    counts = []
    for image in coco.loadImgs(coco.getImgIds()):
        assert (image["width"], image["height"]) == (96, 96)
        with Image.open(os.path.join(tiny_dir, split, image["file_name"])) as img:
            assert img.size == (96, 96) and img.mode == "RGB"
        annos = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        counts.append(len(annos))
        for a in annos:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 96 and y + h <= 96
            # area = visible pixels of the shape: inside its box, and not a sliver of it
            assert 0.2 * w * h <= a["area"] <= w * h
            assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 5
    assert min(counts) >= 1 and max(counts) <= 6
    assert len(coco.getAnnIds()) == sum(counts)


def test_objects_respect_size_aspect_and_overlap_limits(tiny_dir):
    coco = _coco(os.path.join(tiny_dir, "annotations", "instances_train.json"))
    p = SyntheticParams(**TINY)
    for image_id in coco.getImgIds():
        boxes = np.array([a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))])
        w, h = boxes[:, 2], boxes[:, 3]
        # occlusion may shrink a visible box a little below the drawn size, never above it
        assert np.all(np.sqrt(w * h) <= p.max_size * 96 + 1)
        assert np.all(np.sqrt(w * h) >= 0.5 * p.min_size * 96)
        xyxy = torch.tensor(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        iou, _ = box_iou(xyxy, xyxy)
        iou.fill_diagonal_(0)
        assert iou.max() <= p.max_iou + 1e-6


def test_max_iou_zero_keeps_boxes_disjoint(tmp_path):
    p = SyntheticParams(
        num_train=20, num_val=0, image_size=64, min_objects=4, max_iou=0.0, min_visible=0.01
    )
    folder = generate_synthetic_dataset(p, root=str(tmp_path))
    coco = _coco(os.path.join(folder, "annotations", "instances_train.json"))
    for image_id in coco.getImgIds():
        boxes = np.array([a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))])
        xyxy = torch.tensor(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        iou, _ = box_iou(xyxy, xyxy)
        assert torch.count_nonzero(iou) == len(boxes)  # only the diagonal


def test_boxes_are_tight_around_drawn_pixels(tmp_path):
    # one vivid shape on a dull, noiseless, uncluttered background: its saturated pixels' bounds
    # must be the box (quality 100 keeps JPEG ringing from smearing colour past the edges)
    p = SyntheticParams(
        num_train=20,
        num_val=0,
        max_objects=1,
        noise_std=0.0,
        min_distractors=0,
        max_distractors=0,
        jpeg_quality=100,
    )
    folder = generate_synthetic_dataset(p, root=str(tmp_path))
    coco = _coco(os.path.join(folder, "annotations", "instances_train.json"))
    for image in coco.loadImgs(coco.getImgIds()):
        (anno,) = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        rgb = (
            np.asarray(
                Image.open(os.path.join(folder, "train", image["file_name"])), dtype=np.float32
            )
            / 255
        )
        hsv = np.vectorize(colorsys.rgb_to_hsv)(rgb[..., 0], rgb[..., 1], rgb[..., 2])
        ys, xs = np.nonzero(hsv[1] > 0.45)
        x, y, w, h = anno["bbox"]
        np.testing.assert_allclose(
            [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x, y, x + w, y + h]
        )


def test_color_mode_random_decouples_hue_from_class(tmp_path):
    def hue_spread(color_mode):
        p = SyntheticParams(num_train=40, num_val=0, noise_std=0.0, color_mode=color_mode)
        folder = generate_synthetic_dataset(p, root=str(tmp_path))
        coco = _coco(os.path.join(folder, "annotations", "instances_train.json"))
        hues = []
        for a in coco.loadAnns(coco.getAnnIds(catIds=[2])):  # rectangles: their box is all shape
            if a["area"] < a["bbox"][2] * a["bbox"][3]:  # partly covered by another shape
                continue
            image = coco.loadImgs(a["image_id"])[0]
            rgb = np.asarray(
                Image.open(os.path.join(folder, "train", image["file_name"])), dtype=np.float32
            )
            x, y, w, h = (int(v) for v in a["bbox"])
            r, g, b = np.median(rgb[y + h // 2, x : x + w], axis=0) / 255
            hues.append(colorsys.rgb_to_hsv(r, g, b)[0])
        return np.ptp(hues)

    assert hue_spread("class_hue") < 0.15
    assert hue_spread("random") > 0.5


def test_cache_folder_is_keyed_by_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("DAB_DETR_CACHE", str(tmp_path))
    a = synthetic.synthetic_dataset_dir(SyntheticParams(**TINY))
    assert os.path.dirname(a) == str(tmp_path)
    assert a == synthetic.synthetic_dataset_dir(SyntheticParams(**TINY))
    assert a != synthetic.synthetic_dataset_dir(SyntheticParams(color_mode="random", **TINY))


def test_generation_is_atomic_and_ignores_stale_temp_dirs(tmp_path):
    params = SyntheticParams(**TINY)
    final = synthetic.synthetic_dataset_dir(params, str(tmp_path))
    stale = os.path.join(str(tmp_path), f".{os.path.basename(final)}.tmp-crashed")
    os.makedirs(os.path.join(stale, "train"))
    open(os.path.join(stale, "train", "000000.jpg"), "wb").close()

    assert generate_synthetic_dataset(params, root=str(tmp_path)) == final
    assert len(_files(final)) == 12 + 6 + 2
    # only the stale folder is left beside the result: our own temp folder was moved into place
    assert sorted(os.listdir(str(tmp_path))) == sorted(
        [os.path.basename(final), os.path.basename(stale)]
    )
    # a second call reuses the folder without rewriting it
    mtime = os.path.getmtime(os.path.join(final, "annotations", "instances_train.json"))
    generate_synthetic_dataset(params, root=str(tmp_path))
    assert os.path.getmtime(os.path.join(final, "annotations", "instances_train.json")) == mtime


def test_losing_a_generation_race_uses_the_winners_copy(tmp_path, monkeypatch):
    params = SyntheticParams(**TINY)
    final = synthetic.synthetic_dataset_dir(params, str(tmp_path))
    real_rename = os.rename

    def rename_after_another_process_won(src, dst):
        os.makedirs(os.path.join(dst, "annotations"))  # the winner's complete copy
        open(os.path.join(dst, "annotations", "winner"), "w").close()
        real_rename(src, dst)  # raises: the target exists and is not empty

    monkeypatch.setattr(synthetic.os, "rename", rename_after_another_process_won)
    assert generate_synthetic_dataset(params, root=str(tmp_path)) == final
    assert os.listdir(os.path.join(final, "annotations")) == ["winner"]
    assert os.listdir(str(tmp_path)) == [os.path.basename(final)]  # our temp folder was removed


def test_bad_parameters_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="color_mode"):
        SyntheticParams(color_mode="rainbow")
    with pytest.raises(ValueError, match="min_visible"):
        SyntheticParams(min_visible=0.0)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticParams(min_objects=3, max_objects=2)
    with pytest.raises(TypeError, match="num_images"):
        register_synthetic_dataset(root=str(tmp_path), num_images=5)


def test_registration_is_lazy_and_gives_standard_dicts(tmp_path, monkeypatch, clean_catalog):
    monkeypatch.setenv("DAB_DETR_CACHE", str(tmp_path))
    names = register_synthetic_dataset(name_prefix="test_dab_synth", **TINY)
    clean_catalog.extend(names)
    assert names == ("test_dab_synth_train", "test_dab_synth_val")
    meta = MetadataCatalog.get("test_dab_synth_val")
    assert meta.thing_classes == list(synthetic.SHAPE_NAMES) and meta.evaluator_type == "coco"
    assert meta.json_file.startswith(str(tmp_path)) and not os.path.exists(meta.json_file)

    dicts = DatasetCatalog.get("test_dab_synth_train")
    assert len(dicts) == 12 and os.path.exists(meta.json_file)
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (96, 96)
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and 0 <= a["category_id"] < 5

    # registering again is a no-op; other parameters replace the registration
    assert register_synthetic_dataset(name_prefix="test_dab_synth", **TINY) == names
    register_synthetic_dataset(name_prefix="test_dab_synth", seed=3, **TINY)
    assert MetadataCatalog.get("test_dab_synth_val").json_file != meta.json_file


def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path, clean_catalog):
    names = register_synthetic_dataset(
        root=str(tmp_path), name_prefix="test_dab_synth_eval", **TINY
    )
    clean_catalog.extend(names)
    mapper = DetrDatasetMapper(build_detr_test_augmentation(96, 200), is_train=False)
    loader = build_detection_test_loader(DatasetCatalog.get(names[1]), mapper=mapper, num_workers=0)
    evaluator = COCOEvaluator(names[1], output_dir=None)  # reads the json the loader generated
    evaluator.reset()
    gt = {d["image_id"]: d for d in DatasetCatalog.get(names[1])}
    for inputs in loader:
        for x in inputs:
            annos = gt[x["image_id"]]["annotations"]
            pred = Instances((x["height"], x["width"]))
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
            pred.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            pred.scores = torch.ones(len(annos))
            pred.pred_classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
            evaluator.process([x], [{"instances": pred}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
