"""tools/demo.py: one PNG per image with the predicted boxes drawn where the model puts them."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from PIL import Image

from dab_detr.data.synthetic import SyntheticParams, generate_synthetic_dataset, register_synthetic_dataset

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "dab_detr_synthetic.py")


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """Three images of the synthetic val split (a tiny copy of the dataset, generated in a blink)."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    folder = generate_synthetic_dataset(SyntheticParams(num_train=0, num_val=3), root=root)
    with open(os.path.join(folder, "annotations", "instances_val.json")) as f:
        names = [im["file_name"] for im in json.load(f)["images"]]
    return root, [os.path.join(folder, "val", n) for n in names]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of configs/dab_detr_synthetic.py's model (random) and that model, in eval mode."""
    torch.manual_seed(0)
    cfg = LazyConfig.load(CONFIG)
    cfg.model.criterion = None
    model = instantiate(cfg.model).eval()
    with torch.no_grad():  # make the queries' scores differ more than at initialisation
        model.head.class_embed.weight.normal_(0, 0.1)
        for layer in model.head.transformer.decoder.ref_point_head.layers:
            layer.weight.mul_(20)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path, model


def _predict(model, file_name):
    image = np.asarray(Image.open(file_name).convert("RGB"))
    h, w = image.shape[:2]
    with torch.no_grad():
        inputs = [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": h, "width": w}]
        return image, model(inputs)[0]["instances"]


def test_demo_draws_the_predicted_boxes_and_reports_unreadable_images(val_images, checkpoint, load_tool, tmp_path,
                                                                     capsys):
    _, files = val_images
    ckpt, model = checkpoint
    image, instances = _predict(model, files[0])
    # An untrained model scores its queries alike: draw the top 2-5, with the threshold in the widest gap there,
    # far wider than float noise.
    scores = instances.scores
    gaps = scores[1:5] - scores[2:6]
    num_drawn = int(gaps.argmax()) + 2
    threshold = float(scores[num_drawn - 1] + scores[num_drawn]) / 2
    assert gaps.max() > 1e-5
    unreadable = tmp_path / "broken.jpg"
    unreadable.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"

    rc = load_tool("demo").main(["--config-file", CONFIG, "--input", files[0], str(unreadable), "--output", str(out),
                                 "--confidence-threshold", str(threshold), f"train.init_checkpoint={ckpt}"])
    captured = capsys.readouterr()
    assert rc == 1  # one image failed, the other was still drawn
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and str(unreadable) in errors[0]
    assert f": {num_drawn} detections" in captured.out
    assert sorted(os.listdir(out)) == [os.path.splitext(os.path.basename(files[0]))[0] + ".png"]

    _assert_boxes_drawn(out / os.listdir(out)[0], image, instances.pred_boxes.tensor[:num_drawn])


def _assert_boxes_drawn(png, image, boxes):
    """The PNG is `image` (possibly enlarged) with the outline of every box in `boxes` (xyxy, image pixels) drawn."""
    drawn = np.asarray(Image.open(png).convert("RGB")).astype(int)
    scale = drawn.shape[0] // image.shape[0]  # small images are drawn enlarged
    assert scale >= 1 and drawn.shape[:2] == (image.shape[0] * scale, image.shape[1] * scale)
    original = image.astype(int).repeat(scale, 0).repeat(scale, 1)
    changed = np.abs(drawn - original).sum(-1) > 20
    assert changed.mean() < 0.3  # the picture is the image with a few boxes on it, not something else
    for box in boxes * scale:
        x0, y0, x1, y1 = box.round().long().clamp(0, drawn.shape[0] - 1).tolist()
        outline = np.concatenate([changed[y0, x0:x1], changed[y1, x0:x1], changed[y0:y1, x0], changed[y0:y1, x1]])
        assert outline.mean() > 0.7, (box, outline.mean())  # a box 5 pixels off the prediction scores < 0.45


TRAINED = os.environ.get("DAB_DETR_TRAINED_CHECKPOINT", os.path.join(ROOT, "output", "synthetic", "model_final.pth"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(TRAINED), reason=f"no checkpoint from `make train` at {TRAINED}")
def test_demo_draws_what_the_model_trained_by_make_train_predicts(load_tool, tmp_path, capsys):
    """The main command's model on real val images of the embedded dataset (runs after `make train`)."""
    register_synthetic_dataset()
    from detectron2.data import DatasetCatalog

    file_name = DatasetCatalog.get("dab_synthetic_val")[0]["file_name"]
    cfg = LazyConfig.load(CONFIG)
    cfg.model.criterion = None
    model = instantiate(cfg.model).eval()
    model.load_state_dict(torch.load(TRAINED, weights_only=True)["model"])
    image, instances = _predict(model, file_name)
    threshold = 0.3
    num_drawn = int((instances.scores >= threshold).sum())
    assert num_drawn >= 1, "the trained model finds nothing in the first val image"

    out = tmp_path / "out"
    rc = load_tool("demo").main(["--config-file", CONFIG, "--input", file_name, "--output", str(out),
                                 "--confidence-threshold", str(threshold), f"train.init_checkpoint={TRAINED}"])
    assert rc == 0, capsys.readouterr().err
    assert f": {num_drawn} detections" in capsys.readouterr().out
    _assert_boxes_drawn(out / os.listdir(out)[0], image, instances.pred_boxes.tensor[:num_drawn])


def test_demo_draws_the_first_images_of_a_registered_dataset(val_images, checkpoint, load_tool, tmp_path, capsys):
    root, files = val_images
    register_synthetic_dataset(root=root, name_prefix="demo_test", num_train=0, num_val=3)
    out = tmp_path / "out"
    rc = load_tool("demo").main(["--config-file", CONFIG, "--dataset", "demo_test_val", "--num-images", "2",
                                 "--output", str(out), f"train.init_checkpoint={checkpoint[0]}"])
    assert rc == 0, capsys.readouterr().err
    expected = [os.path.splitext(os.path.basename(f))[0] + ".png" for f in files[:2]]
    assert sorted(os.listdir(out)) == sorted(expected)


def test_demo_without_a_checkpoint_is_one_clear_error(load_tool, tmp_path, capsys):
    rc = load_tool("demo").main(["--config-file", CONFIG, "--input", "x.jpg", "--output", str(tmp_path)])
    assert rc == 1
    assert "train.init_checkpoint is empty" in capsys.readouterr().err
