"""Models, inputs and steps shared by the benchmarks and the tests.

- HF `DabDetrForObjectDetection` with random weights and no identity/zero weights left (FrozenBN statistics, PReLU
  slopes, box-head output layer, anchors, patterns), so that a mapping error cannot hide: `random_hf_model`
  (`randomize_frozen_bn_and_prelu` serves our models too);
- the two sizes we compare: R50 (`hf_r50`, `ours_r50`) and the `configs/dab_detr_synthetic.py` model behind
  `make train` (`hf_synthetic`, `ours_synthetic`);
- inputs (`make_images`, `make_targets`) and one inference call / training step of each side, as closures for
  `benchmarks.measure.alternate`.
"""
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
NUM_CLASSES = 80
SYNTHETIC_CLASSES = 5


# --- HF models ---------------------------------------------------------------------------------------------------
def randomize_frozen_bn_and_prelu(model, g: torch.Generator) -> None:
    """Draw every FrozenBN's statistics and affine and every PReLU's slope from `g`, in place (HF's or ours):
    identity statistics would hide a BN mix-up."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("FrozenBatchNorm2d"):
                module.weight.uniform_(0.5, 1.0, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(0.1, 0.4, generator=g)


def randomize_hf_weights(model, seed: int = 1, class_embed_std: Optional[float] = None):
    """Replace HF's identity/zero initialisations by random values (in place) and return `model`."""
    g = torch.Generator().manual_seed(seed)
    randomize_frozen_bn_and_prelu(model, g)
    with torch.no_grad():
        last = model.bbox_predictor.layers[-1]  # zero-init: boxes would equal the anchors whatever we compute
        last.weight.normal_(0, 0.02, generator=g)
        last.bias.normal_(0, 0.1, generator=g)
        model.model.query_refpoint_embeddings.weight.normal_(0, 1, generator=g)  # HF: N(0, 0.02), all centred
        if model.model.num_patterns:
            model.model.patterns.weight.normal_(0, 1, generator=g)
        if class_embed_std is not None:
            model.class_embed.weight.normal_(0, class_embed_std, generator=g)
    return model


def random_hf_model(config, seed: int = 0, class_embed_std: Optional[float] = None):
    """`DabDetrForObjectDetection(config)` in eval mode, built after `torch.manual_seed(seed)`, then randomised."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.DabDetrForObjectDetection(config).eval()
    return randomize_hf_weights(model, seed + 1, class_embed_std)


def hf_r50(num_classes: int = NUM_CLASSES, seed: int = 0, freeze_stem: bool = True, **config_kwargs):
    """HF DAB-DETR R50 (timm backbone), our training settings: dropout 0, auxiliary losses, class-loss weight 1
    (HF's default is 2). `freeze_stem`: the same trainable set as ours (`freeze_at=1`)."""
    import transformers

    config = transformers.DabDetrConfig(
        use_pretrained_backbone=False, num_labels=num_classes, dropout=0.0, auxiliary_loss=True,
        cls_loss_coefficient=1, **config_kwargs,
    )
    model = random_hf_model(config, seed)
    if freeze_stem:
        model.model.backbone.conv_encoder.model._backbone.conv1.weight.requires_grad_(False)
    return model


def hf_synthetic(num_classes: int = SYNTHETIC_CLASSES, seed: int = 0):
    """HF's DAB-DETR built as the model of `configs/dab_detr_synthetic.py`: HF's basic-block ResNet (stem 32, three
    stages of one block, 32/64/128 wide) read at `stage3` (stride 16), trainable BN, d=128, 8 heads, 3+3 layers,
    FFN 512, 30 queries, dropout 0. The same layers as ours: 2,097,705 parameters on both sides."""
    import transformers

    config = transformers.DabDetrConfig(
        use_pretrained_backbone=False, use_timm_backbone=False,
        backbone_config=transformers.ResNetConfig(
            layer_type="basic", embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
            out_features=["stage3"],
        ),
        num_labels=num_classes, hidden_size=128, encoder_layers=3, decoder_layers=3, encoder_ffn_dim=512,
        decoder_ffn_dim=512, encoder_attention_heads=8, decoder_attention_heads=8, num_queries=30, dropout=0.0,
        auxiliary_loss=True, cls_loss_coefficient=1,
    )
    model = random_hf_model(config, seed)
    _unfreeze_batchnorm(model)
    return model


def _unfreeze_batchnorm(model) -> None:
    """HF freezes every backbone BatchNorm; the synthetic model trains from scratch with trainable BN."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("FrozenBatchNorm2d"):
                bn = torch.nn.BatchNorm2d(child.weight.shape[0])
                with torch.no_grad():
                    bn.weight.copy_(child.weight), bn.bias.copy_(child.bias)
                    bn.running_mean.copy_(child.running_mean), bn.running_var.copy_(child.running_var)
                setattr(parent, name, bn)


# --- our models --------------------------------------------------------------------------------------------------
def ours_r50(state_dict: Dict[str, torch.Tensor], hf_format: bool, num_classes: int = NUM_CLASSES,
             config_name: str = "dab_detr_r50"):
    """Our DAB-DETR (configs/models/`config_name`.py) with HF's inverse-sigmoid eps, loaded with `state_dict`
    (HF's key layout if `hf_format`)."""
    from detectron2.config import LazyConfig, instantiate

    from dab_detr.checkpoint.hf import load_hf_state_dict

    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "models", config_name + ".py"))
    cfg.model.num_classes = num_classes
    cfg.model.head.inverse_sigmoid_eps = 1e-5  # HF's value (ours defaults to the official 1e-3)
    model = instantiate(cfg.model)
    if hf_format:
        load_hf_state_dict(model, state_dict)
    else:
        model.load_state_dict(state_dict)
    return model


def ours_synthetic(num_classes: int = SYNTHETIC_CLASSES, seed: int = 0):
    """The model of `configs/dab_detr_synthetic.py` (what `make train` trains), and its config (for the optimizer)."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "dab_detr_synthetic.py"))
    cfg.model.num_classes = num_classes
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    return model, cfg


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- inputs ------------------------------------------------------------------------------------------------------
def make_images(batch: int, size: Tuple[int, int], seed: int = 3, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(device)


def make_targets(batch: int, seed: int = 4, device: str = "cpu", num_classes: int = NUM_CLASSES,
                 sizes: Optional[List[int]] = None) -> List[Dict[str, torch.Tensor]]:
    """Targets in our format (labels, normalised cxcywh boxes): `sizes` boxes per image (default 3, 5, ...)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(batch):
        n = sizes[i] if sizes is not None else 3 + 2 * i
        center = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "boxes": torch.cat((center, size), dim=1),
        })
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def as_batched_inputs(images: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> List[Dict]:
    """detectron2 training inputs (what our mapper gives the model): images 0..255, `Instances` in abs xyxy."""
    from detectron2.structures import Boxes, Instances

    from dab_detr.modeling.box_ops import box_cxcywh_to_xyxy

    inputs = []
    for image, t in zip(images, targets):
        h, w = image.shape[-2:]
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(box_cxcywh_to_xyxy(t["boxes"]) * torch.tensor([w, h, w, h], dtype=torch.float32))
        inst.gt_classes = t["labels"]
        inputs.append({"image": (image * 40 + 110).clamp(0, 255), "instances": inst})
    return inputs


# --- one call of each side ---------------------------------------------------------------------------------------
def autocast(device: str, enabled: bool):
    """Mixed precision as our trainer does it: fp16 on CUDA (with a GradScaler in training), bf16 on the CPU."""
    return torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16, enabled=enabled)


def ours_infer(model, images: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    from detectron2.structures import ImageList

    image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])

    def run():
        out = model.forward_raw(image_list)
        return out["pred_logits"], out["pred_boxes"]

    return run


def hf_infer(model, images: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    pixel_mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)

    def run():
        out = model(pixel_values=images, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes

    return run


def adamw(model, lr: float = 1e-4, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """HF's Trainer default on torch >= 2.8 (`adamw_torch_fused`): one group, fused kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def train_step(model, loss_fn: Callable[[], torch.Tensor], amp: bool, optimizer: Optional[torch.optim.Optimizer] = None,
               clip_max_norm: Optional[float] = None) -> Callable[[], torch.Tensor]:
    """forward + loss (`loss_fn`, under autocast if `amp`) + backward [+ clip] + optimizer step; a GradScaler for
    fp16 on CUDA."""
    device = next(model.parameters()).device.type
    optimizer = optimizer if optimizer is not None else adamw(model)
    scaler = torch.amp.GradScaler(device) if amp and device == "cuda" else None
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn()
        if scaler is None:
            loss.backward()
            if clip_max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if clip_max_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_max_norm)
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    return step


def ours_train_step(model, images: torch.Tensor, targets, amp: bool = False, **step_kwargs) -> Callable:
    """Our step on a padded batch: `forward_raw` + criterion (the R50 comparison)."""
    from detectron2.structures import ImageList

    image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])
    return train_step(
        model, lambda: sum(model.criterion(model.forward_raw(image_list), targets).values()), amp, **step_kwargs
    )


def ours_full_train_step(model, batched_inputs: List[Dict], amp: bool = False, **step_kwargs) -> Callable:
    """Our step as the trainer runs it: `model(batched_inputs)` (normalise, pad, prepare targets) + losses."""
    return train_step(model, lambda: sum(model(batched_inputs).values()), amp, **step_kwargs)


def hf_train_step(model, images: torch.Tensor, targets, amp: bool = False, **step_kwargs) -> Callable:
    pixel_mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    return train_step(
        model, lambda: model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss, amp, **step_kwargs
    )
