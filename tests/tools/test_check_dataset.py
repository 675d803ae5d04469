"""tools/check_dataset.py: the dataset checks of train_net, run alone."""
import json
import os

import numpy as np
from PIL import Image


def _write(tmp_path, annotations, write_images=True):
    root = tmp_path / "images"
    root.mkdir()
    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 24} for i in (1, 2)]
    if write_images:
        for img in images:
            Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / img["file_name"])
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps({
        "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
    }))
    return str(json_file), str(root)


def _ann(ann_id, bbox, category_id=1):
    return {"id": ann_id, "image_id": 1, "category_id": category_id, "bbox": bbox, "iscrowd": 0}


def test_a_good_dataset_passes_with_a_summary_and_the_boxes_training_will_change(tmp_path, run_tool):
    json_file, root = _write(tmp_path, [_ann(1, [1, 1, 10, 10]), _ann(2, [20, 5, 30, 5], 3), _ann(3, [1, 1, 0, 4])])
    proc = run_tool("check_dataset", json_file, root)
    assert proc.returncode == 0, proc.stderr
    assert "OK: 2 images, 3 annotations, 2 categories" in proc.stdout
    assert "1 clipped to the image" in proc.stderr and "1 dropped: zero or negative width/height" in proc.stderr


def test_a_bad_dataset_is_one_line_naming_the_json_and_the_annotation(tmp_path, run_tool):
    json_file, root = _write(tmp_path, [_ann(1, [1, 1, 10, 10]), _ann(7, [1, 1, 5, 5], 2)])
    proc = run_tool("check_dataset", json_file, root)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and json_file in lines[0] and "annotation id=7" in lines[0] and "category_id=2" in lines[0]


def test_missing_image_files_are_reported_unless_skipped(tmp_path, load_tool, capsys):
    json_file, root = _write(tmp_path, [_ann(1, [1, 1, 10, 10])], write_images=False)
    tool = load_tool("check_dataset")
    assert tool.main([json_file, root]) == 1
    assert f"2 of 2 image files are missing under {root}" in capsys.readouterr().err
    assert tool.main([json_file, root, "--skip-files"]) == 0
    assert os.path.basename(json_file) in capsys.readouterr().out
