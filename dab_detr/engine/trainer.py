"""One DETR training step: forward, backward, gradient clipping, non-finite check, optimizer step."""
import logging
import math
import random
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..errors import NonFiniteLossError
from .train_loader import derived_seed

logger = logging.getLogger(__name__)


class DetrTrainer(SimpleTrainer):
    """detectron2's `SimpleTrainer` plus what DETR training needs and LazyConfig training lacks.

    - gradient-norm clipping over all parameters (`clip_max_norm`; DETR recipes use 0.1), logged as `grad_norm`;
    - optional AMP: fp16 + `GradScaler` on CUDA, bf16 autocast on CPU;
    - a non-finite loss (or, in fp32, a non-finite gradient norm) stops training at that iteration with every loss
      term named, on every rank at once (so distributed runs fail instead of hanging), before the weights change;
    - with a `seed`, the global RNGs (dropout, ...) are re-seeded from (seed, rank, iteration) before each step and
      the data loader (if it has `set_start_iter`, like `ResumableTrainLoader`) starts at the start iteration, so
      a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        clip_max_norm: Optional[float] = 0.1,
        clip_norm_type: float = 2.0,
        amp: bool = False,
        seed: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.seed = None if seed is None or seed < 0 else int(seed)
        if clip_max_norm is not None and clip_max_norm <= 0:
            raise ValueError(f"train.clip_grad.max_norm must be > 0 (or clipping disabled), got {clip_max_norm}")
        self.clip_max_norm = clip_max_norm
        self.clip_norm_type = clip_norm_type
        self.amp = amp
        device = next(model.parameters()).device
        self._device_type = device.type
        self._amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None

    def run_step(self):
        assert self.model.training, "[DetrTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.seed is not None:
            self._seed_iteration()

        with torch.autocast(self._device_type, dtype=self._amp_dtype, enabled=self.amp):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        self.after_backward()
        grad_norm = self._clip_gradients()

        # The step's one read of the device, after the backward (a read before it would hold back the backward's
        # launch on an accelerator): the loss terms, the gradient norm and whether every rank's loss is finite.
        host_losses, grad_norm, finite = self._read_step(loss_dict, losses, grad_norm)
        self._check_finite(finite, host_losses, grad_norm)
        self._write_metrics(host_losses, data_time)
        if grad_norm is not None:
            get_event_storage().put_scalar("grad_norm", grad_norm, smoothing_hint=True)

        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def train(self, start_iter: int, max_iter: int):
        set_start = getattr(self.data_loader, "set_start_iter", None)
        if set_start is not None:
            set_start(start_iter)
        elif start_iter > 0:
            logger.warning(
                f"The train loader ({type(self.data_loader).__name__}) cannot skip to iteration {start_iter}: "
                "the resumed run sees its data stream from the beginning"
            )
        super().train(start_iter, max_iter)

    def _seed_iteration(self):
        # After the data is fetched: with num_workers=0 the mapper runs in this process.
        seed = derived_seed(self.seed, comm.get_rank(), self.iter)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _clip_gradients(self) -> Optional[torch.Tensor]:
        """Clip all gradients to `clip_max_norm`; their norm before clipping (a device tensor), or None."""
        if self.clip_max_norm is None:
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, self.clip_max_norm, self.clip_norm_type)

    def _read_step(self, loss_dict, losses, grad_norm):
        """(loss terms on the host, gradient norm or None, whether every rank's total loss is finite), copied
        to the host at once."""
        values = [v.detach().float().reshape(()) for v in loss_dict.values()]
        if grad_norm is not None:
            values.append(grad_norm.detach().float().reshape(()))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must stop together, or the others would wait forever in the next collective.
            finite = torch.isfinite(losses.detach()).to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        else:
            finite = torch.isfinite(losses.detach())
        values.append(finite.float().reshape(()))
        host = torch.stack([v.to(losses.device) for v in values]).cpu()  # the norm may sit on another device
        host_losses = dict(zip(loss_dict, host))  # 0-dim host tensors, as detectron2's metrics writer takes them
        return host_losses, (float(host[len(loss_dict)]) if grad_norm is not None else None), bool(host[-1])

    def _check_finite(self, finite: bool, host_losses, grad_norm: Optional[float]):
        """Raise `NonFiniteLossError` before the optimizer step: a non-finite loss (on any rank), or in fp32 a
        non-finite gradient norm (with a GradScaler those are expected now and then: the scaler skips the step)."""
        if not finite or not all(math.isfinite(float(v)) for v in host_losses.values()):
            terms = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(host_losses.items()))
            raise NonFiniteLossError(
                f"Loss became infinite or NaN at iteration {self.iter} (on at least one worker); "
                f"the weights were not updated. This worker's losses: {terms}"
            )
        if grad_norm is not None and self.grad_scaler is None and not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"Non-finite gradient norm ({grad_norm}) at iteration {self.iter}; "
                "the weights were not updated. Lower the learning rate or check the data of this iteration."
            )

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
