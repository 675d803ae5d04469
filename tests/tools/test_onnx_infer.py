"""tools/onnx_infer.py: draws the boxes tools/demo.py draws (same model, same threshold) with onnxruntime, numpy
and Pillow only; tools/export_model.py: the classes come from the checkpoint, bad options are one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from scipy.optimize import linear_sum_assignment

from dab_detr.data.synthetic import SyntheticParams, generate_synthetic_dataset
from tests.helpers import TINY_SYNTHETIC_OVERRIDES

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "dab_detr_synthetic.py")
TINY = list(TINY_SYNTHETIC_OVERRIDES)
CLASSES = ["disc", "square", "triangle", "ring", "ellipse"]


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """Three images of the embedded dataset's val split (a small copy generated here)."""
    folder = generate_synthetic_dataset(SyntheticParams(num_train=0, num_val=3),
                                        root=str(tmp_path_factory.mktemp("synthetic")))
    with open(os.path.join(folder, "annotations", "instances_val.json")) as f:
        return [os.path.join(folder, "val", im["file_name"]) for im in json.load(f)["images"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint with its classes, exported ONNX file) of a random tiny synthetic-config model whose scores are
    spread out (a fresh model scores every query alike)."""
    folder = tmp_path_factory.mktemp("onnx_infer")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(CONFIG), TINY)
    cfg.model.criterion = None
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    with torch.no_grad():
        model.head.class_embed.weight.normal_(0, 0.3)
        model.head.bbox_embed.layers[-1].weight.normal_(0, 0.05)
        for layer in model.head.transformer.decoder.ref_point_head.layers:  # queries differ more
            layer.weight.mul_(20)
    checkpoint = str(folder / "model.pth")
    torch.save({"model": model.state_dict(),
                "dataset_metadata": {"thing_classes": CLASSES,
                                     "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(5)}}}, checkpoint)
    onnx_file = str(folder / "model.onnx")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "tools/export_model.py", "--format", "onnx", *TINY[:4],
                           "--config-file", CONFIG, f"train.init_checkpoint={checkpoint}", *TINY[4:],
                           "--output", onnx_file], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 classes, opset 18, dynamic" in proc.stdout
    return checkpoint, onnx_file


def test_onnx_infer_draws_the_boxes_demo_draws_without_torch(val_images, exported, load_tool, tmp_path, capsys):
    import onnx

    checkpoint, onnx_file = exported
    meta = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
    assert json.loads(meta["dab_detr.class_names"]) == CLASSES  # from the checkpoint: no dataset given

    # What demo.py draws, and a threshold in the widest score gap of the first image (far wider than float noise).
    from dab_detr.visualization import Predictor

    cfg = LazyConfig.apply_overrides(LazyConfig.load(CONFIG), TINY + [f"train.init_checkpoint={checkpoint}"])
    predictor = Predictor(cfg)
    instances = [predictor(f) for f in val_images]
    scores = instances[0].scores
    gaps = scores[1:20] - scores[2:21]
    threshold = float(scores[int(gaps.argmax()) + 1] + scores[int(gaps.argmax()) + 2]) / 2
    assert gaps.max() > 1e-3 and scores[0] < 0.999

    rc = load_tool("demo").main(["--config-file", CONFIG, *TINY[:3], "--input", *val_images, "--output",
                                 str(tmp_path / "demo"), f"train.init_checkpoint={checkpoint}", *TINY[3:],
                                 "--confidence-threshold", str(threshold)])
    demo_out = capsys.readouterr().out
    assert rc == 0

    # onnx_infer.py in a fresh interpreter that must not import torch or detectron2
    script = (
        "import runpy, sys; sys.argv = ['onnx_infer.py'] + sys.argv[1:]\n"
        "try:\n    runpy.run_path('tools/onnx_infer.py', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'detectron2', 'dab_detr'))\n"
        "print('IMPORTED', bad)\nsys.exit(code or (1 if bad else 0))\n"
    )
    out_dir = tmp_path / "onnx"
    proc = subprocess.run([sys.executable, "-c", script, *val_images, "--model", onnx_file, "--output", str(out_dir),
                           "--confidence-threshold", str(threshold)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMPORTED []" in proc.stdout
    assert sorted(os.listdir(out_dir)) == sorted(os.listdir(tmp_path / "demo")) + ["detections.json"]

    detections = json.load(open(out_dir / "detections.json"))
    for file, inst in zip(val_images, instances):
        drawn = inst[inst.scores >= threshold]
        ours = [d for d in detections[file] if d["score"] >= threshold]
        assert len(ours) == len(drawn)
        assert f"{file} -> " in demo_out and f": {len(drawn)} detections >= {threshold}" in proc.stdout
        assert [d["class"] for d in ours] == [CLASSES[c] for c in drawn.pred_classes.tolist()]
        if ours:
            boxes = np.array([d["box"] for d in ours])
            cost = np.abs(boxes[:, None] - drawn.pred_boxes.tensor.numpy()[None]).max(-1)
            rows, cols = linear_sum_assignment(cost)
            assert cost[rows, cols].max() < 1e-2  # pixels (the JSON keeps 3 decimals)


def test_export_model_errors_are_one_line(exported, tmp_path):
    checkpoint, _ = exported
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)

    def run(*args):
        return subprocess.run([sys.executable, "tools/export_model.py", "--config-file", CONFIG, *TINY,
                               f"train.init_checkpoint={checkpoint}", "--output", str(tmp_path / "m.onnx"), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    proc = run("--format", "onnx", "--opset", "11")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "export_model.py: error: --opset 11 is not supported: use 18..22"
    proc = run("--format", "onnx", "--static", "480by640")
    assert proc.stderr.strip().endswith("--static '480by640': expected HEIGHTxWIDTH, e.g. 480x640")
    proc = run("--format", "tflite")
    assert proc.returncode == 2 and "invalid choice: 'tflite'" in proc.stderr
    proc = run("--format", "onnx", "stray")
    assert proc.returncode == 2 and "unrecognized argument 'stray'" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_infer_names_a_missing_model_and_unreadable_images(exported, tmp_path):
    _, onnx_file = exported
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    run = [sys.executable, os.path.join(ROOT, "tools", "onnx_infer.py")]
    proc = subprocess.run(run + [str(broken), "--model", str(tmp_path / "none.onnx"), "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("none.onnx: no such file")
    proc = subprocess.run(run + [str(broken), "--model", onnx_file, "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"{broken}: cannot read the image")
