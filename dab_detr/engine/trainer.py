"""One DETR training step: forward, non-finite check, backward, gradient clipping, optimizer step."""
import time
from typing import Optional

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage


class DetrTrainer(SimpleTrainer):
    """detectron2's `SimpleTrainer` plus what DETR training needs and LazyConfig training lacks.

    - gradient-norm clipping over all parameters (`clip_max_norm`; DETR recipes use 0.1), logged as `grad_norm`;
    - optional AMP: fp16 + `GradScaler` on CUDA, bf16 autocast on CPU;
    - a non-finite loss (or, in fp32, a non-finite gradient norm) stops training at that iteration with every loss
      term named, on every rank at once (so distributed runs fail instead of hanging), before the weights change.
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
        **kwargs,
    ):
        super().__init__(model, data_loader, optimizer, **kwargs)
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

        with torch.autocast(self._device_type, dtype=self._amp_dtype, enabled=self.amp):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self._check_finite(losses, loss_dict)

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        self.after_backward()

        grad_norm = self._clip_gradients()
        self._write_metrics(loss_dict, data_time)
        if grad_norm is not None:
            get_event_storage().put_scalar("grad_norm", float(grad_norm), smoothing_hint=True)

        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _clip_gradients(self):
        if self.clip_max_norm is None:
            return None
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_max_norm, self.clip_norm_type)
        # With a GradScaler, inf/NaN gradients are expected now and then: the scaler skips that step.
        if self.grad_scaler is None and not torch.isfinite(grad_norm):
            raise FloatingPointError(
                f"Non-finite gradient norm ({float(grad_norm)}) at iteration {self.iter}; "
                "the weights were not updated. Lower the learning rate or check the data of this iteration."
            )
        return grad_norm

    def _check_finite(self, losses, loss_dict):
        finite = torch.isfinite(losses.detach()).to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must stop together, or the others would wait forever in the next all-reduce.
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            terms = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(loss_dict.items()))
            raise FloatingPointError(
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
