"""Training hooks for reliability checks."""
import hashlib
import logging
from typing import Dict

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["parameter_digests", "check_parameters_in_sync", "ParametersInSyncCheck"]

logger = logging.getLogger(__name__)


def parameter_digests(model: torch.nn.Module) -> Dict[str, str]:
    """A hash of the exact bytes of each parameter, by name (unwrapping DDP)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    digests = {}
    for name, p in model.named_parameters():
        # reshape(-1): a channels_last weight with 1x1 kernels counts as contiguous yet keeps a last stride != 1
        data = p.detach().cpu().contiguous().reshape(-1)
        digests[name] = hashlib.sha1(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def check_parameters_in_sync(model: torch.nn.Module) -> int:
    """Raise if any parameter differs (bitwise) between the processes; returns the number of tensors compared.

    DDP keeps replicas equal only as long as every gradient is all-reduced and every process steps the same way;
    a parameter outside DDP's buckets, or a rank-dependent update, makes them drift without any error.
    """
    if comm.get_world_size() == 1:
        return sum(1 for _ in model.parameters())
    mine = parameter_digests(model)
    everyone = comm.all_gather(mine)
    differ = sorted(k for k in mine if any(other.get(k) != mine[k] for other in everyone))
    if differ or any(set(other) != set(mine) for other in everyone):
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise RuntimeError(
            f"Model parameters differ between the {len(everyone)} training processes: {shown or 'different names'}"
        )
    return len(mine)


class ParametersInSyncCheck(HookBase):
    """After training (and every `period` iterations if > 0), check that all processes hold the same parameters."""

    def __init__(self, model: torch.nn.Module, period: int = 0):
        self.model = model
        self.period = period

    def _check(self, done: int):
        n = check_parameters_in_sync(self.model)
        if comm.get_world_size() > 1:
            logger.info(
                f"Parameters identical on all {comm.get_world_size()} processes after {done} iterations "
                f"({n} tensors compared bitwise)"
            )

    def after_step(self):
        if self.period > 0 and (self.trainer.iter + 1) % self.period == 0:
            self._check(self.trainer.iter + 1)

    def after_train(self):
        # only after a complete run: after an error the other processes may not reach this collective
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self._check(self.trainer.max_iter)
