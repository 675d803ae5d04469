"""Helpers for the reliability tests: small COCO-format datasets written to disk, and `tools/train_net.py` runs.

The datasets are what users bring: PNG/JPEG files plus a COCO json, with whatever is wrong in them written
explicitly by each test.
"""
import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from tests.helpers import TINY_SYNTHETIC_OVERRIDES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "dab_detr_synthetic.py")
CATEGORIES = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}, {"id": 3, "name": "blue"}]
COLORS = {1: (230, 30, 30), 2: (30, 230, 30), 3: (30, 30, 230)}

# configs/dab_detr_synthetic.py shrunk to a model that trains a step in ~50 ms (tests.helpers)
TINY_MODEL = [*TINY_SYNTHETIC_OVERRIDES, "model.head.num_queries=10", "model.num_select=10"]
TINY_LOOP = [
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.test.batch_size=2",
    "train.log_period=1",
    "train.eval_period=1000",
]


def box_image(size, boxes, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: noise with each (x, y, w, h, category) box filled with its category's colour."""
    w, h = size
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    for x, y, bw, bh, cat in boxes:
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1, y1 = min(int(x + max(bw, 0)), w), min(int(y + max(bh, 0)), h)
        if x1 > x0 and y1 > y0:
            pixels[y0:y1, x0:x1] = COLORS.get(cat, (200, 200, 200))
    return pixels


def default_images(n: int, size=(64, 48), seed: int = 0) -> List[dict]:
    """n image specs with 1-3 boxes each (the counts differ between images)."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        boxes = []
        for j in range(1 + (i % 3)):
            bw, bh = int(rng.integers(8, 20)), int(rng.integers(8, 20))
            x, y = int(rng.integers(0, size[0] - bw)), int(rng.integers(0, size[1] - bh))
            boxes.append((float(x), float(y), float(bw), float(bh), 1 + (i + j) % 3))
        specs.append({"size": size, "boxes": boxes})
    return specs


def write_coco(root: str, specs: Sequence[dict], categories: Optional[List[dict]] = None) -> Dict[str, str]:
    """Write the images of `specs` under `root/images` and their COCO json to `root/annotations.json`.

    A spec: `size` (w, h), `boxes` [(x, y, w, h, category_id)], optional `file_name`, `json_size` (the width and
    height written to the json, default `size`), `save` (a function `(path, pixels) -> None` writing the file;
    default PNG), `write` (False: list the image but write no file). Returns {"json": path, "images": folder}.
    """
    images_dir = os.path.join(root, "images")
    os.makedirs(images_dir, exist_ok=True)
    images, annotations = [], []
    for i, spec in enumerate(specs):
        file_name = spec.get("file_name", f"{i:04d}.png")
        pixels = box_image(spec["size"], spec["boxes"], seed=i)
        if spec.get("write", True):
            save = spec.get("save", lambda path, px: Image.fromarray(px).save(path))
            save(os.path.join(images_dir, file_name), pixels)
        jw, jh = spec.get("json_size", spec["size"])
        images.append({"id": i + 1, "file_name": file_name, "width": jw, "height": jh})
        for x, y, w, h, cat in spec["boxes"]:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                "bbox": [x, y, w, h], "area": float(abs(w * h)), "iscrowd": 0,
            })
    json_file = os.path.join(root, "annotations.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": CATEGORIES if categories is None else categories}, f)
    return {"json": json_file, "images": images_dir}


def dataset_args(train: Dict[str, str], test: Optional[Dict[str, str]] = None) -> List[str]:
    """`--register-coco` options and dataset-name overrides for a train (and test) dataset of `write_coco`."""
    test = train if test is None else test
    return [
        "--register-coco", "rel_train", train["json"], train["images"],
        "--register-coco", "rel_test", test["json"], test["images"],
    ]


def train_net_argv(options: Sequence[str], overrides: Sequence[str], config: str = CONFIG) -> List[str]:
    """Options first, then the dataset names, the tiny settings and `overrides`."""
    return [
        "--config-file", config, *options,
        "dataloader.train.dataset.names=rel_train", "dataloader.test.dataset.names=rel_test",
        *TINY_MODEL, *TINY_LOOP, *overrides,
    ]


def run_train_net(options: Sequence[str], overrides: Sequence[str], config: str = CONFIG, timeout: int = 300):
    """Run tools/train_net.py in a new process; returns the CompletedProcess (`.stdout` / `.stderr` text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, TRAIN_NET, *train_net_argv(options, overrides, config)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


_TRAIN_NET_MODULE = None


def train_net_module():
    """tools/train_net.py imported as a module (by path: detectron2's wheel may ship a `tools` package)."""
    global _TRAIN_NET_MODULE
    if _TRAIN_NET_MODULE is None:
        spec = importlib.util.spec_from_file_location("dab_detr_train_net", TRAIN_NET)
        _TRAIN_NET_MODULE = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_TRAIN_NET_MODULE)
    return _TRAIN_NET_MODULE


@contextlib.contextmanager
def isolated_loggers():
    """Undo, afterwards, what an in-process train_net / demo run does to the detectron2, fvcore and dab_detr
    loggers (detectron2's `setup_logger` adds handlers writing to the sys.stdout of that moment, which pytest
    closes after the test, and stops propagation): later tests would otherwise log into a closed stream."""
    names = ("detectron2", "fvcore", "dab_detr")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
    try:
        yield
    finally:
        for n, (handlers, propagate) in saved.items():
            logging.getLogger(n).handlers[:] = handlers
            logging.getLogger(n).propagate = propagate


def run_train_net_in_process(options: Sequence[str], overrides: Sequence[str], capsys):
    """`train_net.cli(argv)` in this process (the single-process path of the script, without the interpreter
    start-up); returns a CompletedProcess-like object with the exit status and captured output."""
    capsys.readouterr()
    try:
        with isolated_loggers():
            train_net_module().cli(train_net_argv(options, overrides))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args=options, returncode=code, stdout=out, stderr=err)


def error_lines(proc) -> List[str]:
    """stderr lines that are not warnings printed by third-party code (Python warnings, torch's C++ log lines
    such as "W1125 06:01:47.43 ... No CUDA runtime is found")."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return [
        line for line in lines
        if "Warning" not in line and not line.startswith("  warnings.warn") and not re.match(r"[WI]\d{4} ", line)
    ]


def assert_one_line_error(proc, *fragments: str) -> str:
    """train_net exited with status 1 and printed exactly one error line containing `fragments`, no traceback."""
    assert proc.returncode == 1, f"exit status {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("train_net.py: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def metrics_rows(output_dir: str) -> List[dict]:
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]
