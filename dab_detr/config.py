"""yacs defaults for DAB-DETR (`cfg.MODEL.DAB_DETR.*`); LazyConfig users use `configs/models/*.py` instead.

Usage: `cfg = get_cfg(); add_dab_detr_config(cfg); cfg.MODEL.META_ARCHITECTURE = "DABDETR"`, with a backbone
that outputs `MODEL.DAB_DETR.IN_FEATURE`, e.g. `MODEL.BACKBONE.NAME = "build_resnet_backbone"`,
`MODEL.RESNETS.OUT_FEATURES = ["res5"]`, `MODEL.RESNETS.NORM = "FrozenBN"`, `MODEL.RESNETS.STRIDE_IN_1X1 = False`,
ImageNet RGB `MODEL.PIXEL_MEAN/STD` and `INPUT.FORMAT = "RGB"`. Note that detectron2's `RESNETS.RES5_DILATION = 2`
also dilates res5's first block, unlike torchvision's DC5 (see `dab_detr.meta_arch.resnet_stages`).
"""
from detectron2.config import CfgNode as CN


def add_dab_detr_config(cfg: CN) -> None:
    """Add `MODEL.DAB_DETR` with the paper's defaults (DESIGN.md section 2)."""
    cfg.MODEL.DAB_DETR = c = CN()
    c.NUM_CLASSES = 80
    c.IN_FEATURE = "res5"
    c.HIDDEN_DIM = 256
    c.NUM_QUERIES = 300
    c.NHEADS = 8
    c.ENC_LAYERS = 6
    c.DEC_LAYERS = 6
    c.DIM_FEEDFORWARD = 2048
    c.DROPOUT = 0.0
    c.ACTIVATION = "prelu"
    c.NUM_PATTERNS = 0
    c.QUERY_SCALE_TYPE = "cond_elewise"
    c.MODULATE_HW_ATTN = True
    c.KEEP_QUERY_POS = False
    c.RM_SELF_ATTN_DECODER = False
    c.BBOX_EMBED_DIFF_EACH_LAYER = False
    c.RANDOM_REFPOINTS_XY = False
    c.FREEZE_ANCHOR_XY = False
    c.ANCHOR_INIT = ""  # "" = N(0, 1) logits (official); "spread" for training from scratch
    c.PE_TEMPERATURE_H = 20.0
    c.PE_TEMPERATURE_W = 20.0
    c.PRIOR_PROB = 0.01
    c.INVERSE_SIGMOID_EPS = 1e-3
    c.AUX_LOSS = True
    # denoising training (DN-DETR): off in the paper's DAB-DETR
    c.DN = False
    c.DN_GROUPS = 5
    c.DN_LABEL_NOISE_PROB = 0.2
    c.DN_BOX_NOISE_SCALE = 0.4
    # matcher costs
    c.COST_CLASS = 2.0
    c.COST_BBOX = 5.0
    c.COST_GIOU = 2.0
    # loss weights
    c.CLASS_WEIGHT = 1.0
    c.BBOX_WEIGHT = 5.0
    c.GIOU_WEIGHT = 2.0
    c.FOCAL_ALPHA = 0.25
    c.FOCAL_GAMMA = 2.0
    # inference / input
    c.NUM_SELECT = 300
    c.SIZE_DIVISIBILITY = 32
