"""Image files as users hand them to tools/demo.py: every mode is drawn, unreadable files are named."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from PIL import Image

from dab_detr.config_checks import apply_overrides_checked
from reliability_helpers import CONFIG, REPO, TINY_MODEL, box_image, isolated_loggers

DEMO = os.path.join(REPO, "tools", "demo.py")


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("dab_detr_tool_demo_reliability", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights of the tiny model (5 classes: the config's test set is the synthetic one)."""
    cfg = apply_overrides_checked(LazyConfig.load(CONFIG), TINY_MODEL)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("demo_ckpt") / "model.pth")
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    return path


def _pixels():
    return box_image((64, 48), [(10.0, 8.0, 30.0, 20.0, 1)], seed=3)


def _run(demo, files, out, checkpoint, capsys):
    with isolated_loggers():
        rc = demo.main(["--config-file", CONFIG, "--input", *map(str, files), "--output", str(out),
                        "--confidence-threshold", "0.0", f"train.init_checkpoint={checkpoint}", *TINY_MODEL])
    return rc, capsys.readouterr()


def test_demo_draws_gray_rgba_palette_and_jpeg_files(demo, checkpoint, tmp_path, capsys):
    pixels = _pixels()
    files = {
        "gray.png": Image.fromarray(pixels).convert("L"),
        "rgba.png": Image.fromarray(pixels).convert("RGBA"),
        "palette.png": Image.fromarray(pixels).convert("P"),
        "photo.jpg": Image.fromarray(pixels),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    rc, captured = _run(demo, [tmp_path / n for n in files], tmp_path / "out", checkpoint, capsys)
    assert rc == 0, captured.err
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.splitext(n)[0] + ".png" for n in files)


def test_demo_names_missing_and_truncated_files_and_draws_the_rest(demo, checkpoint, tmp_path, capsys):
    good, truncated = tmp_path / "good.png", tmp_path / "truncated.jpg"
    Image.fromarray(_pixels()).save(good)
    Image.fromarray(_pixels()).save(truncated, "JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    rc, captured = _run(demo, [good, truncated, tmp_path / "missing.png"], tmp_path / "out", checkpoint, capsys)
    assert rc == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert any(str(truncated) in e for e in errors) and any("missing.png" in e for e in errors)
    assert os.listdir(tmp_path / "out") == ["good.png"]


def test_demo_draws_a_16bit_png_with_its_contrast(demo, checkpoint, tmp_path, capsys):
    gray = np.asarray(Image.fromarray(_pixels()).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(tmp_path / "deep.png")
    rc, captured = _run(demo, [tmp_path / "deep.png"], tmp_path / "out", checkpoint, capsys)
    assert rc == 0, captured.err
    drawn = np.asarray(Image.open(tmp_path / "out" / "deep.png").convert("L"))
    assert (drawn >= 250).mean() < 0.5  # detectron2's read_image gives an all-white picture
