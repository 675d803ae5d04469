"""tools/convert_weights.py: official checkpoints end to end, and one clear line on stderr for bad input."""
import argparse
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from dab_detr.engine import DetrCheckpointer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
R50_CONFIG = os.path.join(ROOT, "configs", "dab_detr_r50_50ep.py")


@pytest.fixture(scope="module")
def official_files(official_reference, tmp_path_factory):
    """Official R50 and R50-DC5-3patterns checkpoints as the official code saves them (weights + args + epoch)."""
    root = tmp_path_factory.mktemp("official")
    files = {}
    for name, tsv in [("r50", official_reference.R50_TSV), ("dc5_3pat", official_reference.R50_DC5_3PATTERNS_TSV)]:
        state = official_reference.official_state_dict(tsv)
        files[name] = str(root / f"{name}.pth")
        torch.save({"model": state, "args": argparse.Namespace(lr=1e-4, epochs=50), "epoch": 49}, files[name])
    return files


def test_official_checkpoint_converts_and_loads_as_init_checkpoint(official_files, load_tool, tmp_path, capsys):
    output = tmp_path / "dab_detr_r50.pth"
    rc = load_tool("convert_weights").main(["--source", "official", official_files["r50"], str(output),
                                            "--config-file", R50_CONFIG])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "80 classes" in captured.out and captured.err == ""

    cfg = LazyConfig.load(R50_CONFIG)
    cfg.model.criterion = None
    model = instantiate(cfg.model)
    DetrCheckpointer(model).load(str(output))  # what train.init_checkpoint=... does
    official = torch.load(official_files["r50"], weights_only=False)["model"]
    assert torch.equal(model.head.anchor_boxes(), official["refpoint_embed.weight"])
    assert torch.equal(model.head.class_embed.bias[0], official["class_embed.bias"][1])  # person = COCO id 1
    res4_conv1 = model.state_dict()["backbone.res4.0.conv1.weight"]
    assert torch.equal(res4_conv1, official["backbone.0.body.layer3.0.conv1.weight"])


def test_bad_file_is_one_line_on_stderr_without_traceback(run_tool, tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint\n")
    result = run_tool("convert_weights", "--source", "official", bad, tmp_path / "out.pth")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0] and "not a readable PyTorch checkpoint" in lines[0]
    assert not (tmp_path / "out.pth").exists()


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_truncated_checkpoint(official_files, load_tool, tmp_path, capsys):
    with open(official_files["dc5_3pat"], "rb") as f:
        head = f.read(1 << 20)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(head)
    assert load_tool("convert_weights").main(["--source", "official", str(truncated), str(tmp_path / "o.pth")]) == 1
    line = _one_error_line(capsys)
    assert str(truncated) in line and "truncated" in line


def test_wrong_kind_of_checkpoint_names_what_it_looks_like(load_tool, tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    source = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), str(source))
    assert load_tool("convert_weights").main(["--source", "official", str(source), str(tmp_path / "o.pth")]) == 1
    line = _one_error_line(capsys)
    assert str(source) in line and "looks like a torchvision ResNet checkpoint (--source torchvision)" in line


def test_weights_of_another_architecture_do_not_fit_the_config(official_files, load_tool, tmp_path, capsys):
    tool = load_tool("convert_weights")
    output = tmp_path / "o.pth"
    args = ["--source", "official", official_files["dc5_3pat"], str(output), "--config-file", R50_CONFIG]
    assert tool.main(args) == 1
    line = _one_error_line(capsys)
    assert official_files["dc5_3pat"] in line and "do not fit" in line and "transformer.patterns.weight" in line
    assert not output.exists()
    # --no-strict writes it anyway and reports the difference as a warning
    assert tool.main(args + ["--no-strict"]) == 0
    assert output.exists() and "warning: checkpoint keys the model lacks" in capsys.readouterr().err


def test_output_never_overwrites_the_input(official_files, load_tool, capsys):
    before = os.path.getmtime(official_files["r50"])
    args = ["--source", "official", official_files["r50"], official_files["r50"]]
    assert load_tool("convert_weights").main(args) == 1
    assert "is the input checkpoint" in _one_error_line(capsys)
    assert os.path.getmtime(official_files["r50"]) == before


def test_dn_detr_checkpoint_converts_into_the_denoising_config(official_reference, load_tool, tmp_path, capsys):
    state = official_reference.official_state_dict(official_reference.R50_TSV)
    state["label_enc.weight"] = torch.randn(92, 255)  # official DN-DETR: DAB-DETR + the label embedding
    source = tmp_path / "dn_detr.pth"
    torch.save({"model": state, "args": argparse.Namespace(use_dn=True), "epoch": 49}, source)
    output = tmp_path / "dn_dab_detr_r50.pth"
    config = os.path.join(ROOT, "configs", "dn_dab_detr_r50_50ep.py")
    rc = load_tool("convert_weights").main(["--source", "dn_detr", str(source), str(output), "--config-file", config])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "80 classes" in captured.out and captured.err == ""
    # given as --source official, the label embedding has no place: one line that names what the file is
    rc = load_tool("convert_weights").main(["--source", "official", str(source), str(tmp_path / "x.pth")])
    err = capsys.readouterr().err
    assert rc == 1 and "label_enc.weight" in err and "--source dn_detr" in err
