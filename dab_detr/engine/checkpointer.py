"""detectron2's checkpointer with crash-safe writes and loud shape checks."""
import os
from typing import Any, Callable, Dict

import torch

from ..atomic_io import atomic_write, remove_stale_temporary_files
from ..errors import CheckpointError, MissingFileError
from .compat import HookedCheckpointer

def _is_local(path: str) -> bool:
    return "://" not in path


class DetrCheckpointer(HookedCheckpointer):
    """`DetectionCheckpointer` that

    - writes through detectron2's `PathManager` (a remote `save_dir` works), and for a local `save_dir` atomically
      (temporary file + rename, for the checkpoint and for `last_checkpoint`), so a process killed mid-save leaves
      the previous checkpoint and `last_checkpoint` valid;
    - refuses to load a checkpoint whose tensors have different shapes from the model's (detectron2 only warns and
      silently keeps random weights). A different class count is named as such, and `reinit_classifier=True` drops
      the classifier from the checkpoint instead (fine-tuning on a dataset with other classes);
    - names the file when it is not a readable checkpoint;
    - removes temporary files left by a process killed mid-save before its first save.
    """

    def __init__(self, model, save_dir: str = "", *, reinit_classifier: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.reinit_classifier = reinit_classifier
        self._loading = "<checkpoint>"
        self._cleaned = False

    # -- saving --------------------------------------------------------------------------------------------------
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        if not self._cleaned and _is_local(self.save_dir):
            for path in remove_stale_temporary_files(self.save_dir):
                self.logger.info(f"Removed {path}, left by a process killed while saving")
            self._cleaned = True
        self.logger.info("Saving checkpoint to {}".format(save_file))
        self._write(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(os.path.basename(save_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        self._write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename), "w")

    def _write(self, path: str, write: Callable, mode: str) -> None:
        if _is_local(path):
            atomic_write(path, write, mode)
        else:  # remote storage: its handler decides how a file appears
            with self.path_manager.open(path, mode) as f:
                write(f)

    # -- loading -------------------------------------------------------------------------------------------------
    def load(self, path: str, *args, **kwargs):
        if path and not path.startswith(("detectron2://", "http://", "https://")):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise MissingFileError(f"Checkpoint file not found: {path}")
        self._loading = path
        return super().load(path, *args, **kwargs)

    def read_checkpoint(self, filename: str) -> Dict[str, Any]:
        try:
            return super().read_checkpoint(filename)
        except Exception as e:  # unpickling / zip errors come in many types; all mean the same to a user
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(f"{filename}: not a readable checkpoint ({type(e).__name__}: {first_line})") from e

    def load_model_state(self, checkpoint: Dict[str, Any]):
        state = checkpoint.get("model")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self._loading}: no 'model' state dict in this checkpoint")
        own = self.model.state_dict()
        mismatched = {
            k: (tuple(v.shape), tuple(own[k].shape))
            for k, v in state.items()
            if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
        }
        cls_keys = [k for k in mismatched if "class_embed" in k]
        if cls_keys and self.reinit_classifier:
            self.logger.warning(f"Re-initialising the classifier: dropped {cls_keys} from {self._loading}")
            for k in cls_keys:
                del state[k], mismatched[k]
        elif cls_keys:
            ckpt_n, model_n = mismatched[cls_keys[0]][0][0], mismatched[cls_keys[0]][1][0]
            raise CheckpointError(
                f"{self._loading}: the checkpoint has {ckpt_n} classes but the model has {model_n} (from the "
                "dataset's categories). Pass --reinit-classifier to train a new classifier from these weights."
            )
        if mismatched:
            details = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in sorted(mismatched.items()))
            raise CheckpointError(
                f"{self._loading}: tensor shapes differ from the model (another architecture?): {details}"
            )
        return super().load_model_state(checkpoint)
