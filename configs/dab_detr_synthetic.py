"""DAB-DETR trained from scratch on the embedded synthetic dataset, sized for a 2-core CPU (`make train`).

Data: `dab_synthetic_{train,val}` (dab_detr/data/synthetic.py): 3,000 / 300 images of 128x128, 5 shape classes,
1-6 objects each, generated on first use into ~/.cache/dab_detr (or $DAB_DETR_CACHE).

What makes a DETR learn from scratch in minutes (docs/design.md §6, and our own runs; see README "Getting started"):
- a tiny basic-block ResNet (stem + 3 stages of one block, 32/64/128 wide) read at res4, stride 16, so 128 px
  gives 8x8 tokens (a stride-1, 256-wide res5 after it cost ~15% of the step and gave no AP: README);
  trainable BN (FrozenBN is an identity without pretrained weights) and Kaiming init;
- anchors spread over the image (`anchor_init="spread"`): all anchors at the centre barely learns;
- lr 1e-3 everywhere (no pretrained backbone to protect), 100-iteration warm-up, cosine to 5 %, clip 1.0.
"""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler
from omegaconf import OmegaConf

from dab_detr.backbone import small_resnet_stages
from dab_detr.data import DetrDatasetMapper, register_synthetic_dataset
from dab_detr.engine import build_resumable_train_loader

from .common.optim import AdamW as optimizer
from .common.train import train
from .models.dab_detr_r50 import model

# --- model: 2.1M parameters ------------------------------------------------------------------------------------
model.backbone = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=32, norm="BN"),
    stages=L(small_resnet_stages)(depths=[1, 1, 1], widths=[32, 64, 128], stem_width=32, strides=[1, 2, 2],
                                  norm="BN"),
    out_features=["res4"],
    freeze_at=0,
)
model.in_feature = "res4"
model.size_divisibility = 16
model.head.hidden_dim = 128
model.head.nheads = 8
model.head.num_encoder_layers = 3
model.head.num_decoder_layers = 3
model.head.dim_feedforward = 512
model.head.num_queries = 30  # up to 6 objects per image
model.head.anchor_init = "spread"
model.num_select = 100
model.num_classes = 5  # taken from the dataset by tools/train_net.py anyway

# --- data ------------------------------------------------------------------------------------------------------
register_synthetic_dataset()  # dab_synthetic_train / dab_synthetic_val (files generated on first use)
# The harder variant, classes told apart by shape alone (colours random): select it with
# dataloader.train.dataset.names=dab_synthetic_shapes_train dataloader.test.dataset.names=dab_synthetic_shapes_val
register_synthetic_dataset(name_prefix="dab_synthetic_shapes", color_mode="random")
dataloader = OmegaConf.create()
dataloader.train = L(build_resumable_train_loader)(  # detectron2's loader, resumable exactly (docs/reliability.md)
    dataset=L(get_detection_dataset_dicts)(names="dab_synthetic_train"),
    mapper=L(DetrDatasetMapper)(augmentation=[L(T.RandomFlip)()], is_train=True, image_format="RGB"),
    total_batch_size=16,
    seed="${...train.seed}",
    # In-process loading (~900 images/s at 128 px, 8% of a step) beats a worker process here: with 2 cores, a
    # worker steals time from the training threads (measured 0.227 vs 0.244 s/iteration).
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="dab_synthetic_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(augmentation=[], is_train=False, image_format="RGB"),
    num_workers=1,
    batch_size=16,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}", output_dir="${...train.output_dir}")

# --- optimisation ----------------------------------------------------------------------------------------------
optimizer.lr = 1e-3
optimizer.params.lr_factor_func.factor = 1.0  # from scratch: the backbone trains at the full lr
# x 16 = 44,800 images = 15 epochs, in fp32 (`make train` runs the bf16 + denoising variant,
# dn_dab_detr_synthetic.py): AP 44.3 / AP50 70.5 on the embedded val set (one thread, README "Model zoo").
train.max_iter = 2800
train.clip_grad.max_norm = 1.0
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.05),
    warmup_length=100 / 2800,  # 100 iterations, as a fraction of train.max_iter
    warmup_method="linear",
    warmup_factor=0.001,
)
train.eval_period = 700  # 4 evaluations (~8 s each) for the learning curve
train.checkpointer = dict(period=1000, max_to_keep=2)
train.log_period = 50
train.output_dir = "./output/synthetic"
train.device = "cpu"
