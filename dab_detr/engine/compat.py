"""The one place that relies on non-public detectron2 / fvcore behaviour; tests/reliability/test_compat.py fails if
that behaviour changes.

fvcore's `Checkpointer.load(path)` reads the file with `self._load_file(path)` and puts it into the model with
`self._load_model(checkpoint)`. detectron2's `DetectionCheckpointer` overrides both, and there is no public hook to
check a checkpoint between reading it and loading it. `HookedCheckpointer` gives the two steps public names.
"""
from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["HookedCheckpointer"]


class HookedCheckpointer(DetectionCheckpointer):
    """`DetectionCheckpointer` whose `load` steps can be overridden as `read_checkpoint` and `load_model_state`."""

    def read_checkpoint(self, filename: str) -> Dict[str, Any]:
        """Read `filename` (a local path) into a checkpoint dict; detectron2's reader by default."""
        return super()._load_file(filename)

    def load_model_state(self, checkpoint: Dict[str, Any]):
        """Load `checkpoint["model"]` into the model; detectron2's loader by default (returns incompatible keys)."""
        return super()._load_model(checkpoint)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        return self.read_checkpoint(filename)

    def _load_model(self, checkpoint: Dict[str, Any]):
        return self.load_model_state(checkpoint)
