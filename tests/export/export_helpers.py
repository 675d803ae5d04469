"""Models and inputs for the export tests: random weights with nothing left at an identity or zero init (BN
statistics, PReLU slopes, the last box layer, anchors; in deformable models also the sampling offsets and
attention weights, GroupNorm, the zero biases and the two-stage proposal norm) so that a mix-up in the exported
graph shows."""
import os

import torch
from detectron2.config import LazyConfig, instantiate
from torch import nn

import dab_detr  # noqa: F401  (registers the meta-architectures)
from dab_detr.modeling.ms_deform_attn import MSDeformAttn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def perturb_(model: nn.Module, seed: int = 1) -> nn.Module:
    """In place: random BN / FrozenBN statistics and affine, PReLU slopes, box-MLP last layers and anchors; in
    deformable attention, query-dependent sampling offsets (their ring init is kept as the bias) and attention
    weights (zero-initialised: uniform weights, offsets independent of the query) and the value / output biases;
    GroupNorm affine, the input projections' zero conv biases and the two-stage proposal LayerNorm. DAB-DETR has
    none of the latter, so its weights are the same as before they were added."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "running_var") and hasattr(module, "running_mean"):
                module.weight.uniform_(0.5, 1.0, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(module, MSDeformAttn):
                module.sampling_offsets.weight.normal_(0, 0.02, generator=g)
                module.attention_weights.weight.normal_(0, 0.02, generator=g)
                module.attention_weights.bias.normal_(0, 0.5, generator=g)
                module.value_proj.bias.normal_(0, 0.02, generator=g)
                module.output_proj.bias.normal_(0, 0.02, generator=g)
            elif isinstance(module, nn.GroupNorm) or (isinstance(module, nn.LayerNorm) and "enc_output_norm" in name):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
            elif isinstance(module, nn.Conv2d) and module.bias is not None and not module.bias.any():
                module.bias.normal_(0, 0.02, generator=g)
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(0.1, 0.4, generator=g)
            elif isinstance(module, nn.Linear) and "bbox_embed" in name:
                module.weight.normal_(0, 0.02, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
            elif isinstance(module, nn.Linear) and "class_embed" in name:
                module.weight.normal_(0, 0.2, generator=g)
        head = model.head
        if hasattr(head, "anchor_box_embed"):
            head.anchor_box_embed.weight.normal_(0, 1, generator=g)
    return model.eval()


def build_model(config_file: str, overrides=(), num_classes: int = 5, seed: int = 0) -> nn.Module:
    """`config_file` (relative to the repository root) with random, perturbed weights, inference only."""
    cfg = LazyConfig.load(os.path.join(ROOT, config_file))
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    cfg.model.num_classes = num_classes
    cfg.model.criterion = None
    torch.manual_seed(seed)
    return perturb_(instantiate(cfg.model), seed + 1)


def three_inputs(seed: int = 0):
    """The three test inputs: one image 480x640 (h x w), one 640x480, and the zero-padded batch of both.
    Each is `(images (B, 3, H, W) float 0..255, image_sizes (B, 2) int64, [per-image (3, h, w) tensors])`."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (3, 480, 640), generator=g).float()
    b = torch.randint(0, 256, (3, 640, 480), generator=g).float()
    batch = torch.zeros(2, 3, 640, 640)
    batch[0, :, :480, :640], batch[1, :, :640, :480] = a, b
    return [
        (a[None], torch.tensor([[480, 640]]), [a]),
        (b[None], torch.tensor([[640, 480]]), [b]),
        (batch, torch.tensor([[480, 640], [640, 480]]), [a, b]),
    ]
