"""Process set-up for `tools/train_net.py`: detectron2's `launch` on CPU or GPU, DDP on CPU, one-line errors.

detectron2's `launch` already starts N processes with the gloo backend when there is no GPU (`--num-gpus N` means
N processes there), but its `create_ddp_model` passes `device_ids=[local rank]`, which DDP rejects for a CPU
model, and each process would use every core.
"""
import ctypes
import os
import sys
from typing import Callable, Optional

import torch
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.engine import launch
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.mapper import ImageReadError
from ..errors import DabDetrError, one_line

__all__ = ["create_ddp_model", "keep_freed_memory", "set_cpu_threads", "launch_cli", "log_to_file"]


def create_ddp_model(model, **kwargs):
    """detectron2's `create_ddp_model`, which also works for a model on the CPU (gloo)."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


def set_cpu_threads() -> None:
    """Share the cores among the processes of this machine unless OMP_NUM_THREADS says otherwise."""
    local = comm.get_local_size()
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_TUNING_ENV = "DAB_DETR_MALLOC_TUNING"


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 256 << 20) -> bool:
    """Make glibc's malloc serve blocks up to `mmap_threshold` from its heap and keep up to `trim_threshold` of freed
    heap, so that a training step reuses the previous step's activation memory instead of getting fresh pages from
    the kernel. glibc's defaults map large blocks anew and give freed heap back, so that a step can fault its pages
    in again: with this, a CPU training step of the synthetic model takes ~0.94x the time. The price: the process
    keeps its peak memory.
    Returns whether it was applied: glibc on Linux, unless `DAB_DETR_MALLOC_TUNING=0`."""
    if os.environ.get(MALLOC_TUNING_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad))
    return all([mallopt(param, value) == 1 for param, value in settings])


def log_to_file(output_dir: str) -> None:
    """Also write the `dab_detr` loggers' messages into `output_dir/log.txt` (`.rankN`), next to detectron2's."""
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="dab_detr", configure_stdout=False)


def _report(prog: str, error: BaseException) -> None:
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)


class _ProcessEntry:
    """Each process's entry point: logs `dab_detr` messages to stdout (rank 0), runs `main`, and turns a
    `DabDetrError`, or a missing / unreadable / wrongly sized image met during training or evaluation, into one
    line on stderr and exit status 1 (the traceback is in the log). A class, so that it pickles for spawn."""

    def __init__(self, main: Callable, prog: str):
        self.main = main
        self.prog = prog

    def __call__(self, *args):
        setup_logger(distributed_rank=comm.get_rank(), name="dab_detr", abbrev_name="dab")
        try:
            return self.main(*args)
        except (DabDetrError, SizeMismatchError, ImageReadError, FileNotFoundError) as e:
            _report(self.prog, e)
            sys.exit(1)


def launch_cli(main: Callable, args, precheck: Optional[Callable] = None, prog: str = "train_net.py") -> None:
    """`launch(main, ...)` from detectron2's standard arguments; user errors end the program with one line.

    `precheck(args)` runs in this process first when several processes will be started, so that a bad config is
    reported once, before any process starts.
    """
    world_size = args.num_gpus * args.num_machines
    try:
        if precheck is not None and world_size > 1:
            precheck(args)
        launch(
            _ProcessEntry(main, prog), args.num_gpus, num_machines=args.num_machines,
            machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
        )
    except DabDetrError as e:
        _report(prog, e)
        sys.exit(1)
    except torch.multiprocessing.ProcessExitedException as e:
        # a worker already printed its error; the others were stopped
        print(f"{prog}: error: worker {e.error_index} exited with status {e.exit_code}", file=sys.stderr)
        sys.exit(e.exit_code or 1)
