"""detectron2 glue for DAB-DETR: images -> padded batch + padding mask -> `DabDetrHead` -> losses or `Instances`."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from .backbone import fold_frozen_batchnorm, fuse_bottleneck_blocks, use_nhwc_convolutions
from .modeling.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .modeling.dab_detr_head import DabDetrHead
from .modeling.targets import TargetBatch, check_target_batch

__all__ = ["DABDETR", "resnet_stages"]


def resnet_stages(depth: int = 50, norm: str = "FrozenBN", stride_in_1x1: bool = False, res5_dilation: int = 1):
    """Bottleneck stages res2..res5 of a detectron2 `ResNet`; `res5_dilation=2` is DC5 the torchvision way.

    DC5 here means res5 keeps stride 16 and its blocks 1.. use dilation 2 while block 0's 3x3 conv keeps
    dilation 1, as torchvision's `replace_stride_with_dilation` and timm's `output_stride=16` do (the official
    DAB-DETR and HF DC5 models). detectron2's `RESNETS.RES5_DILATION` dilates block 0 too.
    """
    blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
    if depth not in blocks:
        raise ValueError(f"resnet_stages: depth must be one of {sorted(blocks)}, got {depth}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"resnet_stages: res5_dilation must be 1 or 2, got {res5_dilation}")
    stages, in_channels = [], 64
    for idx, (n, out_channels) in enumerate(zip(blocks[depth], [256, 512, 1024, 2048])):
        stride, dilation = (1 if idx == 0 else 2), [1] * n
        if idx == 3 and res5_dilation == 2:
            stride, dilation = 1, [1] + [2] * (n - 1)
        stages.append(
            ResNet.make_stage(
                BottleneckBlock, n, in_channels=in_channels, out_channels=out_channels,
                bottleneck_channels=out_channels // 4, stride_per_block=[stride] + [1] * (n - 1),
                dilation_per_block=dilation, norm=norm, stride_in_1x1=stride_in_1x1,
            )
        )
        in_channels = out_channels
    return stages


def _image_sizes(image_sizes, device: torch.device) -> Tensor:
    """`(B, 2)` int64 (h, w) on `device`; copied without blocking on the device's queue."""
    return torch.as_tensor(image_sizes, dtype=torch.int64).to(device, non_blocking=True)


@META_ARCH_REGISTRY.register()
class DABDETR(nn.Module):
    """DAB-DETR on a detectron2 backbone.

    Builds the padding mask from the real image sizes (training and inference), feeds the `in_feature` map to
    `head`, and returns `criterion`'s weighted losses in training, `[{"instances": Instances}]` in inference.
    `criterion` may be None for an inference-only model.

    Speed: FrozenBN layers of the backbone are folded into their convolutions (`fold_frozen_batchnorm`, same state
    dict), and with `channels_last` the backbone's activations and weights are NHWC (oneDNN's fast layout on CPU;
    ~20% faster convolutions here, and no per-call weight re-layout), its 1x1 convolutions (and `input_proj`) one
    GEMM each on the NHWC view (`modeling.conv.conv2d`), and its bottleneck blocks one autograd node per stage
    (`modeling.bottleneck`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: DabDetrHead,
        criterion: Optional[nn.Module],
        num_classes: int,
        in_feature: str = "res5",
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        num_select: int = 300,
        size_divisibility: int = 32,
        channels_last: bool = True,
    ):
        super().__init__()
        self.connect_head(backbone.output_shape(), head, in_feature)
        if head.num_classes != num_classes:
            raise ValueError(f"DABDETR: num_classes={num_classes} but head.num_classes={head.num_classes}")
        if criterion is not None and getattr(criterion, "num_classes", num_classes) != num_classes:
            raise ValueError(f"DABDETR: num_classes={num_classes} but criterion.num_classes={criterion.num_classes}")
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"DABDETR: pixel_mean {list(pixel_mean)} and pixel_std {list(pixel_std)} differ in length")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"DABDETR: input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if num_select < 1:
            raise ValueError(f"DABDETR: num_select must be >= 1, got {num_select}")
        fold_frozen_batchnorm(backbone)
        if channels_last:
            use_nhwc_convolutions(backbone)  # 1x1 convolutions of NHWC activations as GEMMs
            fuse_bottleneck_blocks(backbone)  # ResNet's bottleneck blocks as one autograd node per stage
            # NHWC weights too (and input_proj's, which reads the NHWC features): with NCHW weights oneDNN re-lays
            # every weight (and its gradient) out on every call, and the backbone's gradients arrive in NCHW.
            backbone.to(memory_format=torch.channels_last)
            head.input_proj.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.head = head
        self.criterion = criterion
        self.num_classes = num_classes
        self.in_feature = in_feature
        self.input_format = input_format
        self.num_select = num_select
        self.channels_last = channels_last
        # Padding to a multiple of the stride makes the nearest-downsampled mask mark exactly the feature cells
        # that see no image pixel.
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @staticmethod
    def connect_head(shapes, head: nn.Module, in_feature) -> None:
        """Check that the backbone outputs `in_feature` and build (or check) the head's input projection."""
        if in_feature not in shapes:
            raise ValueError(f"DABDETR: in_feature {in_feature!r} is not a backbone output {sorted(shapes)}")
        channels = shapes[in_feature].channels
        if head.input_proj is None:
            head.build_input_proj(channels)
        elif head.input_proj.in_channels != channels:
            raise ValueError(
                f"DABDETR: head in_channels={head.input_proj.in_channels} but backbone feature {in_feature!r} "
                f"has {channels} channels"
            )

    @classmethod
    def from_config(cls, cfg):
        """yacs: `MODEL.DAB_DETR.<ARGUMENT>` for each constructor argument (`dab_detr.config`), detectron2's
        backbone, `MODEL.PIXEL_MEAN/STD` and `INPUT.FORMAT`."""
        # Imported here so that inference-only users of the module do not need scipy.
        from .config import yacs_arguments
        from .modeling.criterion import SetCriterion
        from .modeling.matcher import HungarianMatcher

        c = cfg.MODEL.DAB_DETR
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        if c.IN_FEATURE not in shapes:
            raise ValueError(f"MODEL.DAB_DETR.IN_FEATURE {c.IN_FEATURE!r} is not a backbone output {sorted(shapes)}")
        head = DabDetrHead(
            in_channels=shapes[c.IN_FEATURE].channels, num_classes=c.NUM_CLASSES,
            **yacs_arguments(DabDetrHead.__init__, c),
        )
        matcher = HungarianMatcher(**yacs_arguments(HungarianMatcher.__init__, c))
        criterion = SetCriterion(c.NUM_CLASSES, matcher, **yacs_arguments(SetCriterion.__init__, c))
        return {
            "backbone": backbone,
            "head": head,
            "criterion": criterion,
            "num_classes": c.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            **yacs_arguments(cls.__init__, c),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise each `(C, H, W)` image and pad them into one batch (padding = 0 after normalisation). Images of
        one size that needs no padding (a training batch of fixed-size crops) are stacked and normalised at once."""
        images = [x["image"] for x in batched_inputs]
        for image in images:
            if image.dim() != 3 or image.shape[0] != self.pixel_mean.shape[0]:
                raise ValueError(
                    f"DABDETR: 'image' must be ({self.pixel_mean.shape[0]}, H, W), got {tuple(image.shape)}"
                )
        divisor = max(self.size_divisibility, 1)
        size = images[0].shape[-2:]
        if all(image.shape[-2:] == size for image in images) and size[0] % divisor == 0 and size[1] % divisor == 0:
            batch = (torch.stack(images).to(self.device) - self.pixel_mean) / self.pixel_std
            return ImageList(batch, [tuple(size)] * len(images))
        images = [(image.to(self.device) - self.pixel_mean) / self.pixel_std for image in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    @staticmethod
    def padding_mask(images: ImageList, feature_size: Sequence[int]) -> Tensor:
        """`(B, h, w)` bool mask at `feature_size`, True where the padded batch has no image pixel: the pixel-level
        mask downsampled with `F.interpolate` (nearest). Padding is at the bottom and right, so the mask is (padded
        row) | (padded column) and each axis is downsampled alone: O(B * (H + W)), not O(B * H * W)."""
        tensor = images.tensor
        sizes = _image_sizes(images.image_sizes, tensor.device)
        rows = torch.arange(tensor.shape[-2], device=tensor.device)
        cols = torch.arange(tensor.shape[-1], device=tensor.device)
        padded_rows = (rows[None, :] >= sizes[:, 0, None]).float()[:, None, :, None]  # (B, 1, H, 1)
        padded_cols = (cols[None, :] >= sizes[:, 1, None]).float()[:, None, None, :]  # (B, 1, 1, W)
        padded_rows = F.interpolate(padded_rows, size=(feature_size[0], 1))[:, 0, :, :]  # (B, h, 1)
        padded_cols = F.interpolate(padded_cols, size=(1, feature_size[1]))[:, 0, :, :]  # (B, 1, w)
        return (padded_rows + padded_cols) > 0

    def forward_raw(self, images: ImageList, targets: Optional[TargetBatch] = None) -> Dict[str, object]:
        """Raw head outputs (`pred_logits`, `pred_boxes`, `aux_outputs`) for a normalised, padded batch; `targets`
        feed the head's denoising queries in training (if it has `dn` on)."""
        x = images.tensor
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)[self.in_feature]
        return self.head(features, self.padding_mask(images, features.shape[-2:]), targets)

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            if self.criterion is None:
                raise RuntimeError("DABDETR: training needs a criterion (got criterion=None)")
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("DABDETR: every training input needs 'instances'")
            targets = self.prepare_targets([x["instances"] for x in batched_inputs])
            return self.losses(self.forward_raw(images, targets), targets)

        outputs = self.forward_raw(images)
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        return [
            {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]

    def losses(self, outputs: Dict[str, object], targets: TargetBatch) -> Dict[str, Tensor]:
        """Weighted training losses of the raw outputs against the prepared targets."""
        return self.criterion(outputs, targets)

    def prepare_targets(self, instances: List[Instances]) -> TargetBatch:
        """Instances (abs xyxy in the augmented image) -> one checked `TargetBatch` for the whole step: labels
        (T,), boxes (T, 4) cxcywh / image size, concatenated over the batch (the matcher and the criterion reuse it
        for every decoder layer). Normalised and checked where the loader left them (the host): no device sync."""
        sizes = [len(inst) for inst in instances]
        boxes = torch.cat([inst.gt_boxes.tensor for inst in instances])
        scale = torch.tensor([[w, h, w, h] for h, w in (inst.image_size for inst in instances)], dtype=boxes.dtype)
        scale = scale.repeat_interleave(torch.tensor(sizes), dim=0, output_size=len(boxes))
        if scale.device != boxes.device:  # instances a caller put on a device
            scale = scale.to(boxes.device, non_blocking=True)
        boxes = box_xyxy_to_cxcywh(boxes) / scale
        labels = torch.cat([inst.gt_classes for inst in instances])
        checked = check_target_batch(labels, boxes, sizes, self.num_classes)
        return checked._replace(
            labels=checked.labels.to(self.device, non_blocking=True),
            boxes=checked.boxes.to(self.device, non_blocking=True),
        )

    def inference(self, pred_logits: Tensor, pred_boxes: Tensor, image_sizes) -> List[Instances]:
        """Top-`num_select` (query, class) pairs per image; boxes in absolute xyxy of the unpadded image."""
        batch, num_queries, num_classes = pred_logits.shape
        k = min(self.num_select, num_queries * num_classes)
        # top-k on logits = top-k on sigmoid scores (monotonic), without a sigmoid over all Q*C entries
        top_logits, index = pred_logits.flatten(1).topk(k, dim=1)
        scores = top_logits.sigmoid()
        query, labels = index // num_classes, index % num_classes
        boxes = box_cxcywh_to_xyxy(torch.gather(pred_boxes, 1, query[..., None].expand(-1, -1, 4)))
        hw = _image_sizes(image_sizes, boxes.device).to(boxes.dtype)
        boxes = boxes * torch.stack((hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]), dim=-1)[:, None, :]
        results = []
        for i, size in enumerate(image_sizes):
            result = Instances(tuple(size))
            result.pred_boxes = Boxes(boxes[i])
            result.scores = scores[i]
            result.pred_classes = labels[i]
            results.append(result)
        return results
