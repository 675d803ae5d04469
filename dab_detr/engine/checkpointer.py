"""detectron2's checkpointer with crash-safe writes and loud shape checks."""
import os
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer


def _atomic_torch_save(obj: Any, path: str) -> None:
    """Write to `path.tmp`, flush to disk, then rename over `path`: a crash leaves the old file intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DetrCheckpointer(DetectionCheckpointer):
    """`DetectionCheckpointer` that

    - saves atomically (temporary file + rename, for the checkpoint and for `last_checkpoint`), so a process killed
      mid-save leaves the previous checkpoint and `last_checkpoint` valid;
    - refuses to load a checkpoint whose tensors have different shapes from the model's (detectron2 only warns and
      silently keeps random weights). A different class count is named as such, and `reinit_classifier=True` drops
      the classifier from the checkpoint instead (fine-tuning on a dataset with other classes);
    - names the file when it is not a readable checkpoint.
    """

    def __init__(self, model, save_dir: str = "", *, reinit_classifier: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.reinit_classifier = reinit_classifier
        self._loading = "<checkpoint>"

    # -- saving --------------------------------------------------------------------------------------------------
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to {}".format(save_file))
        _atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(os.path.basename(save_file))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        _atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    # -- loading -------------------------------------------------------------------------------------------------
    def load(self, path: str, *args, **kwargs):
        if path and not path.startswith(("detectron2://", "http://", "https://")):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except Exception as e:  # unpickling / zip errors come in many types; all mean the same to a user
            raise RuntimeError(
                f"{filename}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e

    def _load_model(self, checkpoint: Dict[str, Any]):
        state = checkpoint.get("model")
        if not isinstance(state, dict):
            raise ValueError(f"{self._loading}: no 'model' state dict in this checkpoint")
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
            raise ValueError(
                f"{self._loading}: the checkpoint has {ckpt_n} classes but the model has {model_n} (from the "
                "dataset's categories). Pass --reinit-classifier to train a new classifier from these weights."
            )
        if mismatched:
            details = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in sorted(mismatched.items()))
            raise ValueError(f"{self._loading}: tensor shapes differ from the model (another architecture?): {details}")
        return super()._load_model(checkpoint)
