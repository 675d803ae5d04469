# Step schedules in iterations. One COCO epoch = 118,287 images / 16 per batch = 7,393 iterations; like detrex we
# round to 7,500, so 50 epochs = 375,000 iterations with the x0.1 drop at epoch 40 = 300,000 (no warm-up).
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler


def step_schedule(epochs: int, drop_epoch: int, iters_per_epoch: int = 7500):
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1],
            milestones=[drop_epoch * iters_per_epoch, epochs * iters_per_epoch],
        ),
        warmup_length=0,
        warmup_factor=1.0,
    )


lr_multiplier_50ep = step_schedule(50, 40)
lr_multiplier_12ep = step_schedule(12, 11)
