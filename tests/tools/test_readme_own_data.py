"""README's "Your own dataset" and "Export and deploy" commands, run as written on a small generated COCO-format
dataset, so that the README cannot drift from the tools.

Substitutions (the only ones): the R50 config becomes the synthetic-dataset config with a tiny model and a few
iterations (overrides appended to every command), `/data/mydata` the generated dataset, `--num-gpus 8` becomes
`--num-gpus 0` (CPU), `weights/dab_detr_r50.pth` a random checkpoint with another class count (so
`--reinit-classifier` is exercised), and `python` this interpreter. The commands run with bash from a scratch
folder in which `tools` and `configs` point at the repository's.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import TINY_SYNTHETIC_OVERRIDES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SECTIONS = ("## Your own dataset", "## Export and deploy")
SHORT_RUN = ["dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
             "train.max_iter=6", "train.eval_period=1000", "train.checkpointer.period=1000", "train.log_period=1"]

TINY_MODEL = [*TINY_SYNTHETIC_OVERRIDES, "model.head.num_queries=10"]  # as tests/training's tiny model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture
def tiny_coco(tmp_path_factory):
    """A small COCO-format dataset: 3 classes, 64 px JPEGs; {split: (json, image folder)}."""
    from dab_detr.data.synthetic import SyntheticParams, generate_synthetic_dataset

    params = SyntheticParams(num_train=8, num_val=3, image_size=64, num_classes=3, max_objects=3, seed=7)
    folder = generate_synthetic_dataset(params, str(tmp_path_factory.mktemp("tiny_coco")))
    return {split: (os.path.join(folder, "annotations", f"instances_{split}.json"), os.path.join(folder, split))
            for split in ("train", "val")}


def readme_commands(readme: str = os.path.join(ROOT, "README.md")):
    """The commands of the ```bash blocks in SECTIONS, continuation lines joined, in order."""
    text = open(readme, encoding="utf-8").read()
    commands = []
    for title in SECTIONS:
        body = text.split(title, 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
            joined = re.sub(r"\\\n\s*", "", block)
            commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def _as_test_command(command: str, data_root: str, tiny_overrides) -> str:
    command = command.replace("configs/dab_detr_r50_50ep.py", "configs/dab_detr_synthetic.py")
    command = command.replace("/data/mydata", data_root).replace("--num-gpus 8", "--num-gpus 0")
    if command.startswith("python "):
        command = f"{sys.executable} " + command[len("python "):]
    if "--config-file" in command:
        command += " " + " ".join(tiny_overrides + (SHORT_RUN if "train_net.py" in command else []))
    return command


@pytest.mark.slow
def test_readme_own_data_commands_run_as_written(tiny_coco, tmp_path):
    tiny_model_overrides = TINY_MODEL
    commands = readme_commands()
    tools = [c.split()[1] for c in commands]
    assert tools[:5] == ["tools/train_net.py", "tools/train_net.py", "tools/demo.py", "tools/export_model.py",
                         "tools/export_model.py"], tools
    assert "tools/onnx_infer.py" in tools
    # flags both before and after the overrides, as the README promises
    assert re.search(r" [\w.]+=\S+ .*--reinit-classifier", commands[0]) and "--eval-only" in commands[1].split()[-1]

    data = tmp_path / "mydata"
    for split in ("train", "val"):
        json_file, image_root = tiny_coco[split]
        shutil.copytree(image_root, data / split)
        shutil.copy(json_file, data / f"{split}.json")
    os.symlink(os.path.join(ROOT, "tools"), tmp_path / "tools")
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    # "COCO weights": a model of the same architecture with 5 classes (the data has 3)
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, "configs", "dab_detr_synthetic.py")),
                                     tiny_model_overrides)
    cfg.model.criterion, cfg.model.num_classes = None, 5
    (tmp_path / "weights").mkdir()
    torch.save({"model": instantiate(cfg.model).state_dict()}, tmp_path / "weights" / "dab_detr_r50.pth")

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    for command in commands:
        command = _as_test_command(command, str(data), tiny_overrides=tiny_model_overrides)
        proc = subprocess.run(command, shell=True, executable="/bin/bash", cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    out = tmp_path / "output" / "mydata"
    classes = json.load(open(data / "train.json"))["categories"]
    stored = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["dataset_metadata"]
    assert stored["thing_classes"] == [c["name"] for c in sorted(classes, key=lambda c: c["id"])]
    assert sorted(stored["thing_dataset_id_to_contiguous_id"]) == sorted(c["id"] for c in classes)
    assert len(os.listdir(out / "predictions")) == len(os.listdir(data / "val"))
    assert (out / "model.onnx").is_file() and (out / "model.pt2").is_file()
    assert len([f for f in os.listdir(out / "onnx_predictions") if f.endswith(".png")]) == len(os.listdir(data / "val"))
