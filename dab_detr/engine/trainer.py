"""One DETR training step: forward, non-finite check, backward, gradient clipping, optimizer step."""
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
        # Every loss term reaches the host in one copy (one sync on an accelerator instead of one per term): the
        # finiteness check and the logged metrics both read it.
        host_losses = dict(zip(loss_dict, torch.stack([v.detach().float() for v in loss_dict.values()]).cpu()))
        self._check_finite(losses, host_losses)

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        self.after_backward()

        grad_norm = self._clip_gradients()
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

    def _clip_gradients(self):
        if self.clip_max_norm is None:
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_max_norm, self.clip_norm_type))  # 1 sync
        # With a GradScaler, inf/NaN gradients are expected now and then: the scaler skips that step.
        if self.grad_scaler is None and not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"Non-finite gradient norm ({grad_norm}) at iteration {self.iter}; "
                "the weights were not updated. Lower the learning rate or check the data of this iteration."
            )
        return grad_norm

    def _check_finite(self, losses, host_losses):
        """`host_losses`: the loss terms, already on the host."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must stop together, or the others would wait forever in the next all-reduce.
            finite = torch.isfinite(losses.detach()).to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        else:
            finite = all(math.isfinite(float(v)) for v in host_losses.values())
        if not bool(finite):
            terms = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(host_losses.items()))
            raise NonFiniteLossError(
                f"Loss became infinite or NaN at iteration {self.iter} (on at least one worker); "
                f"the weights were not updated. This worker's losses: {terms}"
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
