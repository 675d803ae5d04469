"""Options anywhere around the KEY=VALUE overrides, in every tool; checkpoints that know their classes; errors
that suggest only options the tool has."""
import os

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog

from dab_detr.class_metadata import DatasetMetadata, apply_checkpoint_classes, inference_classes
from dab_detr.cli import parse_args_with_overrides

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "dab_detr_synthetic.py")


@pytest.mark.parametrize("tool", ["train_net", "demo", "export_model"])
def test_options_before_between_and_after_overrides_parse_alike(tool, load_tool):
    parser = load_tool(tool).build_parser()
    flags = {"train_net": ["--eval-only", "--register-coco", "mine", "a.json", "imgs/"],
             "demo": ["--input", "a.jpg", "b.jpg", "--output", "out", "--register-coco", "mine", "a.json", "imgs/"],
             "export_model": ["--format", "onnx", "--output", "m.onnx", "--raw", "--register-coco", "m", "a.json",
                              "imgs/"]}[tool]
    overrides = ["train.init_checkpoint=x.pth", "model.num_select=7"]
    base = ["--config-file", CONFIG]
    parsed = [
        vars(parse_args_with_overrides(parser, base + flags + overrides)),
        vars(parse_args_with_overrides(parser, base + overrides + flags)),
        vars(parse_args_with_overrides(parser, overrides[:1] + base + flags[:3] + overrides[1:] + flags[3:])),
    ]
    assert parsed[0] == parsed[1] == parsed[2]
    assert parsed[0]["opts"] == overrides
    if tool == "demo":
        assert parsed[0]["input"] == ["a.jpg", "b.jpg"]  # the override after --input's files is not a file


def test_flags_and_stray_words_are_never_overrides(load_tool, tmp_path, capsys):
    parser = load_tool("demo").build_parser()
    odd = tmp_path / "x=1.jpg"  # an existing file whose name looks like an override stays a file
    odd.write_bytes(b"")
    args = parse_args_with_overrides(parser, ["--config-file", CONFIG, "--input", str(odd), "--output", "o"])
    assert args.input == [str(odd)] and args.opts == []
    with pytest.raises(SystemExit):
        parse_args_with_overrides(parser, ["--config-file", CONFIG, "--input", "a.jpg", "--output", "o", "--bogus"])
    with pytest.raises(SystemExit):
        parse_args_with_overrides(load_tool("train_net").build_parser(),
                                  ["--config-file", CONFIG, "stray", "--eval-only"])
    assert "unrecognized argument 'stray'" in capsys.readouterr().err


def test_dataset_metadata_is_saved_and_never_replaced_by_a_loaded_checkpoint(tmp_path):
    from dab_detr.engine import DetrCheckpointer

    model = torch.nn.Linear(2, 2)
    ours = DatasetMetadata(["a", "b"], {7: 0, 9: 1})
    DetrCheckpointer(model, str(tmp_path), dataset_metadata=ours).save("model_final")
    data = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert data["dataset_metadata"] == {"thing_classes": ["a", "b"], "thing_dataset_id_to_contiguous_id": {7: 0, 9: 1}}

    other = DatasetMetadata(["x", "y", "z"])
    DetrCheckpointer(model, dataset_metadata=other).load(str(tmp_path / "model_final.pth"))
    assert other.loaded["thing_classes"] == ["a", "b"] and other.state_dict()["thing_classes"] == ["x", "y", "z"]


@pytest.fixture
def registered():
    names = []

    def register(name, classes):
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=list(classes))
        names.append(name)

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _checkpoint(path, classes=None, num_rows=3):
    data = {"model": {"head.class_embed.bias": torch.zeros(num_rows)}}
    if classes is not None:
        data["dataset_metadata"] = {"thing_classes": list(classes), "thing_dataset_id_to_contiguous_id": {}}
    torch.save(data, path)
    return str(path)


def test_checkpoint_classes_set_the_class_count_and_must_match_the_eval_dataset(tmp_path, registered):
    cfg = LazyConfig.load(CONFIG)
    ckpt = _checkpoint(tmp_path / "m.pth", ["cat", "dog", "eel"])
    registered("same_classes", ["cat", "dog", "eel"])
    registered("other_order", ["dog", "cat", "eel"])
    assert apply_checkpoint_classes(cfg, ckpt, ["same_classes"]) == ["cat", "dog", "eel"]
    assert cfg.model.num_classes == 3
    with pytest.raises(ValueError, match=r"^dataset 'other_order' has the classes \['dog', 'cat', 'eel'\] but "):
        apply_checkpoint_classes(cfg, ckpt, ["other_order"])
    assert apply_checkpoint_classes(cfg, _checkpoint(tmp_path / "old.pth"), ["other_order"]) is None


def test_without_stored_classes_the_error_suggests_the_tools_own_option(tmp_path, registered, load_tool):
    registered("five_classes", list("abcde"))
    cfg = LazyConfig.apply_overrides(LazyConfig.load(CONFIG), [
        f"train.init_checkpoint={_checkpoint(tmp_path / 'old.pth', num_rows=3)}",
        "dataloader.test.dataset.names=five_classes"])
    with pytest.raises(ValueError, match=r"stores no class names .* 3 classes.* has 5: .*--register-coco NAME"):
        inference_classes(cfg)
    for tool in ("demo", "export_model", "train_net"):  # every tool that can print it has the option
        assert "--register-coco" in load_tool(tool).build_parser()._option_string_actions
