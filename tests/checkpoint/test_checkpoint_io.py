"""Reading checkpoints with one clear error per problem; writing converted weights atomically."""
import argparse
import datetime
import os

import pytest
import torch

from dab_detr.checkpoint.classes import parse_class_ids, resolve_class_ids
from dab_detr.checkpoint.io import CheckpointError, read_state_dict, save_converted
from dab_detr.errors import DabDetrError


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture
def good_pth(tmp_path):
    path = str(tmp_path / "good.pth")
    torch.save({"model": {"a.weight": torch.ones(2, 3)}, "args": argparse.Namespace(lr=1e-4), "epoch": 49}, path)
    return path


def test_official_style_checkpoint_with_args_namespace_loads_with_weights_only(good_pth):
    assert list(read_state_dict(good_pth)) == ["a.weight"]


def test_plain_and_ddp_prefixed_state_dicts_are_found(tmp_path):
    path = str(tmp_path / "ddp.pth")
    torch.save({"module.x": torch.zeros(1), "module.y": torch.zeros(1)}, path)
    assert sorted(read_state_dict(path)) == ["x", "y"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "missing.pth"), "no such file or folder"),
        (lambda d: (os.makedirs(d / "empty_folder"), str(d / "empty_folder"))[1], "has no model.safetensors or"),
        (lambda d: _write(d / "notes.pth", b"these are not weights\n"), "not a readable PyTorch checkpoint"),
        (lambda d: _write(d / "broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
         "not a readable safetensors file"),
        (lambda d: (torch.save({"when": datetime.datetime(2022, 1, 1)}, str(d / "obj.pth")), str(d / "obj.pth"))[1],
         "datetime.datetime"),
        (lambda d: (torch.save({"model": {"x": 1}}, str(d / "nt.pth")), str(d / "nt.pth"))[1], "no state dict found"),
    ],
    ids=["missing", "empty_folder", "text", "bad_safetensors", "python_object", "no_tensors"],
)
def test_unusable_files_give_one_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DabDetrError, match=message) as err:  # CheckpointError, or MissingFileError
        read_state_dict(path)
    text = str(err.value)
    assert text.startswith(path) and "\n" not in text


def test_truncated_checkpoint_is_reported(good_pth, tmp_path):
    with open(good_pth, "rb") as f:
        data = f.read()
    path = _write(tmp_path / "truncated.pth", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch checkpoint"):
        read_state_dict(path)


def test_save_is_atomic_and_refuses_to_overwrite_its_input(good_pth, tmp_path):
    state = {"w": torch.arange(3.0)}
    with pytest.raises(CheckpointError, match="is the input checkpoint"):
        save_converted(state, good_pth, source_path=good_pth)
    assert list(read_state_dict(good_pth)) == ["a.weight"]  # untouched

    out = str(tmp_path / "sub" / "out.pth")
    save_converted(state, out, source_path=good_pth, metadata={"source": "official"})
    saved = torch.load(out, weights_only=True)
    assert torch.equal(saved["model"]["w"], state["w"]) and saved["conversion"] == {"source": "official"}
    assert os.listdir(tmp_path / "sub") == ["out.pth"]  # no temporary file left behind


def test_class_id_options():
    assert parse_class_ids("1, 2,3") == [1, 2, 3]
    assert resolve_class_ids("auto", 91)[:2] == [1, 2] and len(resolve_class_ids("auto", 91)) == 80
    assert resolve_class_ids("auto", 80) is None and resolve_class_ids("all", 91) is None
    with pytest.raises(ValueError, match="--class-ids"):
        parse_class_ids("person")
    with pytest.raises(ValueError, match="91 raw COCO ids"):
        resolve_class_ids("coco", 80)
    with pytest.raises(ValueError, match="duplicates"):
        resolve_class_ids([3, 3], 10)
