"""Crash-safe checkpoints: a save that fails or is killed leaves the previous checkpoint and `last_checkpoint`
valid, and a resume after it continues from the previous checkpoint."""
import glob
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from dab_detr.engine.checkpointer import DetrCheckpointer
from dab_detr.errors import CheckpointError

# Saves model_0000001, changes the weights, then dies (SIGKILL, nothing flushed or cleaned up) while saving
# model_0000002: halfway through writing the file ("data"), or after the file is in place but while
# last_checkpoint is being replaced ("tag").
_CHILD = r"""
import io, os, signal, sys
import torch
from torch import nn
from dab_detr.engine import checkpointer as ckpt_module

save_dir, stage = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Linear(200, 200)
checkpointer = ckpt_module.DetrCheckpointer(model, save_dir)
checkpointer.save("model_0000001")
with torch.no_grad():
    model.weight.add_(1.0)

real_replace = os.replace
if stage == "data":
    def dying_save(obj, f):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt_module.torch = type("torch", (), {"save": staticmethod(dying_save)})
else:
    def dying_replace(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    ckpt_module.os.replace = dying_replace
checkpointer.save("model_0000002")
print("not killed")
"""


def _kill_during_save(save_dir, stage):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(save_dir), stage], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def _model():
    torch.manual_seed(0)
    return nn.Linear(200, 200)


def _resume(save_dir):
    model = nn.Linear(200, 200)
    with torch.no_grad():
        model.weight.zero_()
    DetrCheckpointer(model, str(save_dir)).resume_or_load("", resume=True)
    return model


@pytest.mark.slow
def test_killed_while_writing_the_checkpoint_leaves_the_previous_one(tmp_path):
    _kill_during_save(tmp_path, "data")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000002.pth").exists()
    (partial,) = glob.glob(str(tmp_path / "model_0000002.pth.tmp.*"))  # the kill really came mid-write
    with pytest.raises(Exception):
        torch.load(partial, weights_only=False)
    assert torch.equal(_resume(tmp_path).weight, _model().weight)  # resumes from the complete checkpoint
    DetrCheckpointer(_model(), str(tmp_path)).save("model_0000003")  # the next save removes the leftover
    assert not os.path.exists(partial)


@pytest.mark.slow
def test_killed_while_updating_last_checkpoint_leaves_both_checkpoints_valid(tmp_path):
    _kill_during_save(tmp_path, "tag")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    new = torch.load(tmp_path / "model_0000002.pth", weights_only=False)  # complete: renamed before the kill
    assert torch.equal(new["model"]["weight"], _model().weight + 1.0)
    assert torch.equal(_resume(tmp_path).weight, _model().weight)


def test_a_failing_write_raises_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = DetrCheckpointer(_model(), str(tmp_path))
    checkpointer.save("model_0000001")

    def disk_full(obj, f):
        f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0000002")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no partial file left
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.equal(_resume(tmp_path).weight, _model().weight)


def test_resume_from_a_truncated_checkpoint_names_the_file(tmp_path):
    DetrCheckpointer(_model(), str(tmp_path)).save("model_0000001")
    path = tmp_path / "model_0000001.pth"
    path.write_bytes(path.read_bytes()[:5000])  # e.g. written by a tool that does not save atomically
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint"):
        _resume(tmp_path)
