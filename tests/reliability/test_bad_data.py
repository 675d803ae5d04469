"""Bad data as users meet it: a COCO json and image files with something wrong, loaded, mapped, trained on.

Each case is either handled (converted, clipped, dropped with a logged count) or an error naming the file and
the image / annotation / field.
"""
import json
import logging
import math
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from PIL import Image

from dab_detr.data.mapper import DetrDatasetMapper, ImageReadError, read_image
from dab_detr.data.coco import register_coco_datasets
from dab_detr.data.validate import validate_coco_json
from dab_detr.errors import DatasetError
from reliability_helpers import (
    assert_one_line_error,
    dataset_args,
    default_images,
    metrics_rows,
    run_train_net,
    run_train_net_in_process,
    write_coco,
)


def _edit_json(json_file, edit):
    with open(json_file) as f:
        data = json.load(f)
    edit(data)
    with open(json_file, "w") as f:
        json.dump(data, f)


def _save_jpeg(path, pixels):
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def _save_truncated_jpeg(path, pixels):
    _save_jpeg(path, pixels)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])  # a half-copied file


def _save_gray(path, pixels):
    Image.fromarray(pixels).convert("L").save(path)


def _save_rgba(path, pixels):
    Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])).save(path)


def _save_gray16(path, pixels):
    gray = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    Image.fromarray(gray).save(path)  # PIL writes a 16-bit grayscale PNG


# --------------------------------------------------------------------------------------------------------------
# Registration (dab_detr.data.coco) and the checks (dab_detr.data.validate), in process


def _as_trained(json_file, image_root, name):
    """The annotations training sees: validated and registered as train_net does, loaded by detectron2, mapped
    by DetrDatasetMapper without augmentation (which clips and drops boxes), back in the json's XYWH form."""
    register_coco_datasets([(name, json_file, image_root)])
    mapper = DetrDatasetMapper(augmentation=[], is_train=True)
    records = []
    for d in DatasetCatalog.get(name):
        inst = mapper(d)["instances"]
        boxes = BoxMode.convert(inst.gt_boxes.tensor, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).tolist()
        records.append({"annotations": [
            {"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": int(c)} for b, c in zip(boxes, inst.gt_classes)
        ]})
    return records


def test_clean_json_loads_like_detectron2_load_coco_json(tmp_path):
    ds = write_coco(str(tmp_path), default_images(5))
    register_coco_datasets([("rel_clean_ours", ds["json"], ds["images"])])
    ours = DatasetCatalog.get("rel_clean_ours")
    theirs = load_coco_json(ds["json"], ds["images"], "rel_clean_theirs")
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert {k: a[k] for k in ("file_name", "height", "width", "image_id")} == {
            k: b[k] for k in ("file_name", "height", "width", "image_id")
        }
        keys = ("bbox", "bbox_mode", "category_id", "iscrowd")
        assert [{k: o[k] for k in keys} for o in a["annotations"]] == [
            {k: o[k] for k in keys} for o in b["annotations"]
        ]


def test_unusable_boxes_are_dropped_and_outside_boxes_clipped_with_counts(tmp_path, dab_caplog):
    size = (64, 48)
    boxes = [
        (10.0, 10.0, 20.0, 10.0, 1),  # fine
        (10.0, 10.0, 0.0, 10.0, 1),  # zero width
        (30.0, 10.0, 10.0, -5.0, 2),  # negative height
        (100.0, 10.0, 10.0, 10.0, 2),  # entirely right of the image
        (-10.0, 40.0, 30.0, 20.0, 3),  # partly outside: clipped to x 0..20, y 40..48
    ]
    ds = write_coco(str(tmp_path), [{"size": size, "boxes": boxes}])
    _edit_json(ds["json"], lambda d: d["annotations"].append(
        {"id": 99, "image_id": 1, "category_id": 1, "bbox": [1.0, float("nan"), 5.0, 5.0], "iscrowd": 0}))
    with dab_caplog.at_level(logging.WARNING, logger="dab_detr"):
        (record,) = _as_trained(ds["json"], ds["images"], "rel_unusable_boxes")
    assert [o["bbox"] for o in record["annotations"]] == [[10.0, 10.0, 20.0, 10.0], [0.0, 40.0, 20.0, 8.0]]
    assert [o["category_id"] for o in record["annotations"]] == [0, 2]
    assert all(o["bbox_mode"] == BoxMode.XYWH_ABS for o in record["annotations"])
    text = dab_caplog.text
    for count in ("1 clipped to the image", "1 dropped: entirely outside the image", "1 dropped: non-finite bbox",
                  "2 dropped: zero or negative width/height"):
        assert count in text, text


def test_category_id_absent_from_categories_names_the_json_and_the_annotation(tmp_path):
    ds = write_coco(str(tmp_path), default_images(3))
    _edit_json(ds["json"], lambda d: d["annotations"][2].update(category_id=7))
    with pytest.raises(DatasetError) as e:
        validate_coco_json(ds["json"], ds["images"])
    message = str(e.value)
    assert ds["json"] in message and "annotation id=3" in message and "category_id=7" in message
    assert "[1, 2, 3]" in message  # the ids that exist


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda d: d["images"][1].pop("width"), ["images[1] (id=2)", "'width'"]),
        (lambda d: d["images"][0].update(height=0), ["images[0] (id=1)", "'height'"]),
        (lambda d: d["annotations"][0].pop("bbox"), ["annotation id=1", "missing 'bbox'"]),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), ["annotation id=2", "'bbox' must be 4 numbers"]),
        (lambda d: d["annotations"][1].update(id=1), ["annotation id=1 (annotations[1])", "appears twice"]),
        (lambda d: d.pop("images"), ["no 'images' list"]),
        (lambda d: d["categories"].append({"id": 1, "name": "again"}), ["category id 1 appears twice"]),
    ],
)
def test_malformed_fields_name_the_json_and_the_entry(tmp_path, edit, fragments):
    ds = write_coco(str(tmp_path), default_images(3))
    _edit_json(ds["json"], edit)
    with pytest.raises(DatasetError) as e:
        validate_coco_json(ds["json"], ds["images"])
    for fragment in [ds["json"], *fragments]:
        assert fragment in str(e.value)


def test_invalid_json_syntax_names_the_file_and_position(tmp_path):
    ds = write_coco(str(tmp_path), default_images(2))
    with open(ds["json"]) as f:
        text = f.read()
    with open(ds["json"], "w") as f:
        f.write(text[: len(text) // 2])  # a half-written file
    with pytest.raises(DatasetError, match=r"not valid JSON .* at line 1, column \d+") as e:
        validate_coco_json(ds["json"], ds["images"])
    assert ds["json"] in str(e.value)


def test_missing_image_files_are_an_error_when_loading_not_hours_later(tmp_path):
    specs = default_images(4)
    specs[2]["write"] = False
    ds = write_coco(str(tmp_path), specs)
    with pytest.raises(DatasetError) as e:
        validate_coco_json(ds["json"], ds["images"])
    assert "1 of 4 image files are missing" in str(e.value)
    assert "image id=3" in str(e.value) and os.path.join(ds["images"], "0002.png") in str(e.value)


# --------------------------------------------------------------------------------------------------------------
# Image files (dab_detr.data.mapper), in process


@pytest.mark.parametrize("save", [_save_gray, _save_rgba, _save_jpeg, _save_gray16])
def test_image_modes_are_read_as_rgb_uint8(tmp_path, save):
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[10:30, 20:50] = (200, 120, 40)
    path = str(tmp_path / "image.png")
    save(path, pixels)
    image = read_image(path, "RGB")
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    # the box stays visible: nothing is clipped to white or black
    inside, outside = image[15:25, 25:45].mean(), image[40:, :10].mean()
    assert outside < 20 and 60 < inside < 220, (inside, outside)


def test_16bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = str(tmp_path / "ramp16.png")
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL really opens it as a 16-bit image
    image = read_image(path, "RGB")
    np.testing.assert_allclose(image[..., 0].astype(float), ramp / 257.0, atol=0.51)
    assert (image[..., 0] == 255).mean() < 0.01  # detectron2's read_image makes >99% of it 255


def test_truncated_image_is_skipped_in_training_and_an_error_at_test_time(tmp_path, dab_caplog):
    path = str(tmp_path / "broken.jpg")
    _save_truncated_jpeg(path, np.zeros((48, 64, 3), np.uint8))
    record = {"file_name": path, "height": 48, "width": 64, "image_id": 5, "annotations": []}
    train = DetrDatasetMapper(augmentation=[], is_train=True)
    with dab_caplog.at_level(logging.WARNING, logger="dab_detr"):
        assert train(record) is None
    assert path in dab_caplog.text and "1 skipped so far" in dab_caplog.text
    with pytest.raises(ImageReadError, match="broken.jpg: cannot read the image"):
        DetrDatasetMapper(augmentation=[], is_train=False)(record)


def test_image_size_differing_from_the_json_names_the_file_and_fields(tmp_path):
    path = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path)
    record = {"file_name": path, "height": 64, "width": 48, "image_id": 12, "annotations": []}
    with pytest.raises(SizeMismatchError) as e:
        DetrDatasetMapper(augmentation=[], is_train=True)(record)
    message = str(e.value)
    assert path in message and "image_id=12" in message and "width=48, height=64" in message
    assert "64x48" in message


# --------------------------------------------------------------------------------------------------------------
# End to end through tools/train_net.py --register-coco


@pytest.mark.slow
def test_train_net_trains_and_evaluates_on_a_messy_dataset(tmp_path):
    """Gray, RGBA, 16-bit and JPEG files, a truncated file, unusable and outside boxes, and images without
    annotations: training and evaluation complete with finite losses, and each fix is logged."""
    specs = default_images(8)
    specs[0]["save"] = _save_gray
    specs[1]["save"] = _save_rgba
    specs[2]["save"] = _save_gray16
    specs[3].update(save=_save_jpeg, file_name="0003.jpg")
    specs[4].update(save=_save_truncated_jpeg, file_name="0004.jpg")
    specs[5]["boxes"] = []  # no annotations
    specs[6]["boxes"] = specs[6]["boxes"] + [(5.0, 5.0, 0.0, 4.0, 1), (50.0, 40.0, 30.0, 30.0, 2)]
    specs[7]["boxes"] = specs[7]["boxes"] + [(80.0, 60.0, 5.0, 5.0, 3), (10.0, 10.0, -3.0, 5.0, 1)]
    train = write_coco(str(tmp_path / "train"), specs)
    test_specs = [dict(s) for s in specs[:4]]  # gray, RGBA, 16-bit, JPEG: evaluation must read them all
    test = write_coco(str(tmp_path / "test"), test_specs)
    out = tmp_path / "out"
    proc = run_train_net(
        ["--num-gpus", "0", *dataset_args(train, test)],
        ["train.max_iter=8", "train.eval_period=0", "train.checkpointer.period=100",
         "dataloader.train.dataset.filter_empty=False", f"train.output_dir={out}"],
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "1 clipped to the image" in log
    assert "2 dropped: zero or negative width/height" in log
    assert "1 dropped: entirely outside the image" in log
    assert f"{os.path.join(train['images'], '0004.jpg')}: cannot read the image" in log  # skipped, named
    losses = [r["total_loss"] for r in metrics_rows(str(out)) if "total_loss" in r]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    results = json.load(open(out / "coco_instances_results.json"))
    assert {r["image_id"] for r in results} == {1, 2, 3, 4}
    assert all(math.isfinite(r["score"]) and all(math.isfinite(v) for v in r["bbox"]) for r in results)


def _stops(tmp_path, capsys, specs, edit=None, overrides=()):
    """train_net.cli in this process (the errors come before or at the first iteration)."""
    ds = write_coco(str(tmp_path / "data"), specs)
    if edit is not None:
        _edit_json(ds["json"], edit)
    proc = run_train_net_in_process(
        ["--num-gpus", "0", *dataset_args(ds)],
        ["train.max_iter=4", f"train.output_dir={tmp_path / 'out'}", *overrides],
        capsys,
    )
    return ds, proc


@pytest.mark.slow
def test_train_net_stops_on_invalid_json_naming_the_file(tmp_path):
    ds = write_coco(str(tmp_path / "data"), default_images(2))
    with open(ds["json"], "a") as f:
        f.write("}")
    proc = run_train_net(["--num-gpus", "0", *dataset_args(ds)], [f"train.output_dir={tmp_path / 'out'}"])
    assert_one_line_error(proc, ds["json"], "not valid JSON")


def test_train_net_stops_on_an_unknown_category_naming_the_annotation(tmp_path, capsys):
    ds, proc = _stops(tmp_path, capsys, default_images(3), edit=lambda d: d["annotations"][4].update(category_id=42))
    assert_one_line_error(proc, ds["json"], "annotation id=5", "category_id=42")


def test_train_net_stops_on_a_missing_image_file_naming_it(tmp_path, capsys):
    specs = default_images(3)
    specs[1]["write"] = False
    ds, proc = _stops(tmp_path, capsys, specs)
    assert_one_line_error(proc, ds["json"], "image id=2", os.path.join(ds["images"], "0001.png"))


def test_train_net_stops_when_an_image_size_differs_from_the_json(tmp_path, capsys):
    specs = default_images(2)
    specs[1]["json_size"] = (48, 64)  # width and height swapped in the json
    ds, proc = _stops(tmp_path, capsys, specs, overrides=["dataloader.train.total_batch_size=4"])
    assert_one_line_error(proc, os.path.join(ds["images"], "0001.png"), "image_id=2", "width=48, height=64")
