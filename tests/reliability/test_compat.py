"""What dab_detr.engine.compat relies on in fvcore / detectron2, and the checkpointer on remote storage."""
import os

import torch
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import NativePathHandler, PathHandler
from torch import nn

from dab_detr.engine.checkpointer import DetrCheckpointer
from dab_detr.engine.compat import HookedCheckpointer


class _Spy(HookedCheckpointer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def read_checkpoint(self, filename):
        self.calls.append("read")
        return super().read_checkpoint(filename)

    def load_model_state(self, checkpoint):
        self.calls.append("load")
        return super().load_model_state(checkpoint)


def test_fvcore_load_still_reads_and_loads_through_the_two_private_steps(tmp_path):
    torch.manual_seed(0)
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    torch.save({"model": source.state_dict()}, tmp_path / "m.pth")
    spy = _Spy(target)
    spy.load(str(tmp_path / "m.pth"))
    assert spy.calls == ["read", "load"]
    assert torch.equal(target.weight, source.weight)


class _PrefixHandler(PathHandler):
    """`dabtest://X` is stored at `<root>/X`: a stand-in for remote storage, reachable only through PathManager."""

    PREFIX = "dabtest://"

    def __init__(self, root):
        super().__init__()
        self.root = root
        self.native = NativePathHandler()

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _local(self, path):
        return os.path.join(self.root, path[len(self.PREFIX):])

    def _open(self, path, mode="r", **kwargs):
        return self.native._open(self._local(path), mode, **kwargs)

    def _exists(self, path, **kwargs):
        return self.native._exists(self._local(path), **kwargs)

    def _isfile(self, path, **kwargs):
        return self.native._isfile(self._local(path), **kwargs)

    def _get_local_path(self, path, **kwargs):
        return self._local(path)


def test_checkpoints_are_written_and_resumed_through_path_manager(tmp_path):
    PathManager.register_handler(_PrefixHandler(str(tmp_path)), allow_override=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    DetrCheckpointer(model, _PrefixHandler.PREFIX).save("model_0000009", iteration=9)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    fresh = nn.Linear(4, 3)
    checkpoint = DetrCheckpointer(fresh, _PrefixHandler.PREFIX).resume_or_load("", resume=True)
    assert checkpoint["iteration"] == 9 and torch.equal(fresh.weight, model.weight)
