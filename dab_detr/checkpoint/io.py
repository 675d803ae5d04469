"""Reading checkpoints (a file or a `save_pretrained` folder) with one clear error, and writing them atomically.

Every reader error is a `CheckpointError` (or `MissingFileError`) from `dab_detr.errors` whose message starts
with the file name and says what is wrong, so a command-line tool can print it as one line.
"""
import argparse
import os
import pickle
import re
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from ..atomic_io import atomic_torch_save
from ..errors import CheckpointError, MissingFileError

__all__ = [
    "CheckpointError",
    "Conversion",
    "HF_WEIGHT_FILES",
    "MissingFileError",
    "find_state_dict",
    "load_checkpoint",
    "read_state_dict",
    "rename_state_dict",
    "resolve_checkpoint_file",
    "save_converted",
]

# What `save_pretrained` writes, in the order we prefer them when a folder holds both.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Official DAB-DETR checkpoints store their command line (`args`) next to the weights: an `argparse.Namespace` of
# plain values, harmless to rebuild, and the only non-tensor class `weights_only=True` must be told about.
_SAFE_GLOBALS = [argparse.Namespace]


class Conversion(NamedTuple):
    """A state dict renamed into our layout, with an account of every source key that did not land in it."""

    state_dict: Dict[str, Tensor]  # our keys
    unused_keys: List[str]  # source keys that map to nothing: reported, an error when loading strictly
    ignored_keys: List[str]  # source keys dropped on purpose (BN counters, tied copies, an ImageNet classifier)


def rename_state_dict(
    state_dict: Mapping[str, Tensor],
    rename: Callable[[str], Optional[str]],
    twin_of: Optional[Callable[[str, Mapping[str, Tensor]], Optional[str]]] = None,
    *,
    source: str,
    drop: Optional[Callable[[str], bool]] = None,
) -> Conversion:
    """Rename every key of `state_dict` with `rename`; a key it maps to None goes to `unused_keys`.

    Dropped on purpose (`ignored_keys`): BN's `num_batches_tracked` counters, keys for which `drop` is true, and
    tied copies, the keys for which `twin_of(key, state_dict)` names the original they duplicate; when that original
    is in `state_dict` the two must be equal, else a `CheckpointError` (message starting with `source`).
    """
    out: Dict[str, Tensor] = {}
    unused: List[str] = []
    ignored: List[str] = []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or (drop is not None and drop(key)):
            ignored.append(key)
            continue
        twin = None if twin_of is None else twin_of(key, state_dict)
        if twin is not None:
            if twin in state_dict and not torch.equal(state_dict[twin], value):
                raise CheckpointError(f"{source} checkpoint: {key} differs from {twin}; a tied copy must equal it")
            ignored.append(key)
            continue
        new_key = rename(key)
        if new_key is None:
            unused.append(key)
        else:
            out[new_key] = value
    return Conversion(out, unused, ignored)


def resolve_checkpoint_file(path: str) -> str:
    """`path` itself if it is a file; for a folder, its `model.safetensors` or `pytorch_model.bin`."""
    if os.path.isdir(path):
        for name in HF_WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        found = sorted(os.listdir(path))[:8]
        raise CheckpointError(
            f"{path}: folder has no {' or '.join(HF_WEIGHT_FILES)} (a save_pretrained folder has one); "
            f"it contains {found}"
        )
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file or folder")
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a `.safetensors` file or a `torch.save` file (with `weights_only=True`) to a dict, on the CPU."""
    file = resolve_checkpoint_file(path)
    if file.endswith(".safetensors"):
        return _load_safetensors(file)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if m:
            raise CheckpointError(
                f"{file}: holds a Python object of type {m.group(1)} besides tensors, which weights_only=True "
                "refuses to load (re-save just the state dict: torch.save(model.state_dict(), ...))"
            ) from e
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({_first_line(e)})") from e
    except Exception as e:  # noqa: BLE001
        # Garbage fails in arbitrary places of the unpickler: truncation is a zip-reader RuntimeError, a text file
        # a KeyError or IndexError. Whatever the type, for the user it means one thing.
        raise CheckpointError(
            f"{file}: not a readable PyTorch checkpoint (truncated, or not a torch.save file?): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def _load_safetensors(file: str) -> Dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(f"{file}: reading .safetensors needs the `safetensors` package (pip install it)") from e
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated?): {_first_line(e)}") from e


def find_state_dict(checkpoint: Mapping[str, Any], path: str) -> Dict[str, Tensor]:
    """The state dict inside a loaded checkpoint: its `model` or `state_dict` entry, or the dict itself.

    A `module.` prefix on every key (a model saved from inside DistributedDataParallel) is removed.
    """
    state = checkpoint
    for entry in ("model", "state_dict"):
        if isinstance(checkpoint.get(entry), Mapping):
            state = checkpoint[entry]
            break
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not state or not_tensors:
        raise CheckpointError(
            f"{path}: no state dict found (expected a 'model' entry or a dict of tensors; "
            f"top-level keys: {preview(list(checkpoint))})"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def read_state_dict(path: str) -> Dict[str, Tensor]:
    """`find_state_dict(load_checkpoint(path))`."""
    return find_state_dict(load_checkpoint(path), path)


def preview(keys: List[str], n: int = 5) -> str:
    """The first `n` keys and how many there are, for one-line messages."""
    shown = ", ".join(str(k) for k in keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def save_converted(state_dict: Mapping[str, Tensor], output: str, *, source_path: str,
                   metadata: Optional[Dict[str, Any]] = None) -> None:
    """Write `{"model": state_dict, "conversion": metadata}` to `output` atomically (temporary file + rename).

    Refuses to write over the source checkpoint: a failed or wrong conversion must never destroy its input.
    """
    source_file = resolve_checkpoint_file(source_path)
    if os.path.isdir(output):
        raise CheckpointError(f"{output}: is a folder; give the output file name (e.g. {output}/model.pth)")
    if _same_file(output, source_file) or _same_file(output, source_path):
        raise CheckpointError(f"{output}: is the input checkpoint; write the converted weights to another file")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    atomic_torch_save({"model": dict(state_dict), "conversion": dict(metadata or {})}, output)
