"""Files that appear whole or not at all: checkpoints and `last_checkpoint` (engine), converted weights (tools)."""
import glob
import os
import re
from typing import Any

import torch
from detectron2.utils.file_io import PathManager

__all__ = ["atomic_write", "atomic_torch_save", "remove_stale_temporary_files"]

_TMP_SUFFIX = re.compile(r"\.tmp\.(\d+)$")


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a power cut could otherwise undo it); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """`write(file)` into `path.tmp.<pid>`, flush it to disk, then rename it over `path` (atomic on POSIX): a
    process killed at any point leaves either the old or the new `path`, never a partial one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with PathManager.open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporary_files(save_dir: str) -> list:
    """Delete `*.tmp.<pid>` files left in `save_dir` by processes killed while saving; returns their paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(save_dir), "*.tmp.*")):
        m = _TMP_SUFFIX.search(path)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed
