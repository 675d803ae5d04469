# Training-loop defaults for tools/train_net.py (detectron2's common/train.py plus what DETR needs).
import torch

train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=375000,
    amp=dict(enabled=False),  # fp16 + GradScaler on CUDA, bf16 autocast on CPU
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    # DETR-family models need gradient-norm clipping; detectron2's LazyConfig loop has none, DetrTrainer adds it.
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    seed=42,
    device="cuda" if torch.cuda.is_available() else "cpu",
)
