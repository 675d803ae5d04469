"""Export a detector to ONNX or to a `torch.export` program that runs on plain tensors.

The exported graph takes `images (B, 3, H, W)` float RGB in 0..255 (zero-padded at the bottom/right when the
images of a batch differ in size) and `image_sizes (B, 2)` int64 (h, w) of each image, and does inside:
normalisation, padding to the model's stride, the padding mask, the model, and the top-k post-processing. It
returns `boxes (B, K, 4)` absolute xyxy clipped to each image's own size, `scores (B, K)` and `labels (B, K)`
(int64), K = min(num_select, queries x classes), best first; or with `raw=True` the head's `pred_logits (B, Q, C)`
and `pred_boxes (B, Q, 4)` (sigmoid cxcywh, relative to each image's real size).

Model-agnostic: any meta-architecture with `pixel_mean`, `pixel_std`, `size_divisibility`, `input_format`,
`num_select` and `forward_raw(ImageList) -> {"pred_logits", "pred_boxes", ...}` exports this way. Models that need a
newer opset (e.g. `grid_sample` needs 16) say so with a `min_onnx_opset` attribute.
"""
import json
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ONNX_OPSETS",
    "ExportError",
    "ExportableDetector",
    "check_onnx_opset",
    "export_model",
    "export_onnx",
    "export_program",
    "export_metadata",
    "parse_static_size",
    "inference_resize_of",
    "trace",
]

# Opsets the exporter (torch.onnx's dynamo path) writes directly (older ones would need a lossy down-conversion)
# and onnxruntime runs: at 23 attention becomes the ONNX `Attention` op, which onnxruntime 1.32's CPU kernel rejects
# with our key-padding mask.
ONNX_OPSETS = range(18, 23)
DEFAULT_OPSET = 18
FORMATS = ("onnx", "exported_program")
_REQUIRED = ("pixel_mean", "pixel_std", "size_divisibility", "input_format", "num_select", "forward_raw")


class ExportError(ValueError):
    """An option or a model that cannot be exported; the message is one line naming it."""


class ExportableDetector(nn.Module):
    """`(images (B, 3, H, W) RGB 0..255, image_sizes (B, 2) int64 h, w)` -> `(boxes, scores, labels)` or, with
    `raw`, `(pred_logits, pred_boxes)`; see the module docstring. Eager, it equals the wrapped model's own
    pre-processing and post-processing (`model([{"image": ...}])`) before detectron2's removal of empty boxes."""

    def __init__(self, model: nn.Module, raw: bool = False):
        super().__init__()
        missing = [name for name in _REQUIRED if not hasattr(model, name)]
        if missing:
            raise ExportError(f"{type(model).__name__} cannot be exported: it has no {', '.join(missing)}")
        if model.input_format not in ("RGB", "BGR"):
            raise ExportError(f"input_format {model.input_format!r} cannot be exported (RGB or BGR)")
        self.model = model
        self.raw = raw

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, ...]:
        from detectron2.structures import ImageList

        model = self.model
        x = images.float()
        if model.input_format == "BGR":
            x = x.flip(1)
        x = (x - model.pixel_mean) / model.pixel_std
        # Pixels past each image's real size are 0 after normalisation, as `ImageList.from_tensors` pads them.
        height, width = x.shape[-2], x.shape[-1]
        sizes = image_sizes.to(torch.int64)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
        x = x * inside[:, None].to(x.dtype)
        stride = model.size_divisibility
        if stride > 1:
            x = F.pad(x, (0, (stride - width % stride) % stride, 0, (stride - height % stride) % stride))
        outputs = model.forward_raw(ImageList(x, sizes))
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if self.raw:
            return logits, boxes
        return postprocess(logits, boxes, sizes, model.num_select)


def postprocess(pred_logits: Tensor, pred_boxes: Tensor, image_sizes: Tensor, num_select: int):
    """Top-k (query, class) pairs of `pred_logits (B, Q, C)` -> `boxes (B, K, 4)` abs xyxy clipped to
    `image_sizes (B, 2)` (h, w), `scores (B, K)`, `labels (B, K)`; the same as the meta-architecture's inference."""
    batch, num_queries, num_classes = pred_logits.shape
    k = min(num_select, num_queries * num_classes)
    top_logits, index = pred_logits.flatten(1).topk(k, dim=1)
    scores = top_logits.sigmoid()
    query, labels = index // num_classes, index % num_classes
    cx, cy, w, h = torch.gather(pred_boxes, 1, query[..., None].expand(-1, -1, 4)).unbind(-1)
    hw = image_sizes.to(pred_boxes.dtype)
    img_h, img_w = hw[:, 0, None], hw[:, 1, None]
    x0 = ((cx - 0.5 * w) * img_w).clamp(min=0)
    y0 = ((cy - 0.5 * h) * img_h).clamp(min=0)
    x1 = ((cx + 0.5 * w) * img_w).clamp(min=0)
    y1 = ((cy + 0.5 * h) * img_h).clamp(min=0)
    boxes = torch.stack((torch.minimum(x0, img_w), torch.minimum(y0, img_h),
                         torch.minimum(x1, img_w), torch.minimum(y1, img_h)), dim=-1)
    return boxes, scores, labels


def parse_static_size(text: str) -> Tuple[int, int]:
    """`"480x640"` -> `(480, 640)` (height x width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ExportError(f"--static {text!r}: expected HEIGHTxWIDTH, e.g. 480x640")
    return int(parts[0]), int(parts[1])


def check_onnx_opset(opset: int, model: Optional[nn.Module] = None) -> None:
    """One-line error unless the exporter writes `opset` and the model's operators exist in it."""
    if opset not in ONNX_OPSETS:
        raise ExportError(f"--opset {opset} is not supported: use {ONNX_OPSETS[0]}..{ONNX_OPSETS[-1]}")
    needed = getattr(model, "min_onnx_opset", None)
    if needed is not None and opset < needed:
        raise ExportError(f"--opset {opset} is too old for {type(model).__name__}: it needs opset >= {needed}")


def inference_resize_of(cfg) -> Optional[Tuple[int, int]]:
    """`(short_edge, max_size)` of the config's test-time `ResizeShortestEdge`, None when the test mapper does not
    resize; the exported graph does not resize, its users do (tools/onnx_infer.py reads it from the metadata)."""
    from detectron2.config import instantiate
    from detectron2.data import transforms as T

    mapper = instantiate(cfg.dataloader.test.mapper)
    augmentations = getattr(mapper, "augmentation", None) or getattr(mapper, "augmentations", [])  # ours, detectron2's
    for aug in getattr(augmentations, "augs", augmentations):
        if isinstance(aug, T.ResizeShortestEdge):
            short = aug.short_edge_length
            if isinstance(short, (tuple, list)):
                if len(set(short)) != 1:
                    raise ExportError(f"test-time ResizeShortestEdge with several sizes {short} cannot be exported")
                short = short[0]
            return int(short), int(aug.max_size)
        raise ExportError(f"test-time augmentation {type(aug).__name__} cannot be reproduced by the export")
    return None


def export_metadata(model: nn.Module, class_names: Optional[Sequence[str]], raw: bool,
                    resize: Optional[Tuple[int, int]] = None) -> Dict[str, str]:
    """String key/values stored in the exported file (ONNX `metadata_props`, or the `.json` next to a program)."""
    meta = {
        "dab_detr.outputs": "raw" if raw else "detections",
        "dab_detr.meta_architecture": type(model).__name__,
        "dab_detr.num_select": str(model.num_select),
        "dab_detr.size_divisibility": str(model.size_divisibility),
        "dab_detr.input": "images (B,3,H,W) float RGB 0..255, image_sizes (B,2) int64 h,w",
    }
    if class_names is not None:
        meta["dab_detr.class_names"] = json.dumps(list(class_names))
    if resize is not None:
        meta["dab_detr.test_resize"] = json.dumps({"short_edge": resize[0], "max_size": resize[1]})
    return meta


def _example_inputs(model: nn.Module, static_hw: Optional[Tuple[int, int]]):
    """A batch of two differently sized images (dims that are not multiples of the stride, so no shape gets
    specialised), or two images of the static size."""
    h, w = static_hw or (227, 205)
    if static_hw is not None and min(static_hw) <= 2 * model.size_divisibility:
        raise ExportError(f"--static {h}x{w}: both sides must exceed twice the stride {model.size_divisibility}")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, h, w, generator=g) * 255
    sizes = torch.tensor([[h, w], [h - 11, w - 7]] if static_hw is None else [[h, w], [h, w]], dtype=torch.int64)
    device = model.pixel_mean.device
    return images.to(device), sizes.to(device)


def _dynamic_shapes(model: nn.Module, static_hw):
    """Batch 1..64, and unless static, height and width from just over two strides to 4096: the exporter proves the
    graph for those sizes only, and every feature map (an extra level at twice the stride included, as deformable
    models add) then has at least 2 x 2 cells."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=64)
    if static_hw is not None:
        return {"images": {0: batch}, "image_sizes": {0: batch}}
    smallest = 2 * model.size_divisibility + 1
    height, width = Dim("height", min=smallest, max=4096), Dim("width", min=smallest, max=4096)
    return {"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}}


def output_names(raw: bool) -> Tuple[str, ...]:
    return ("pred_logits", "pred_boxes") if raw else ("boxes", "scores", "labels")


def trace(model: nn.Module, *, raw: bool = False, static_hw: Optional[Tuple[int, int]] = None):
    """`torch.export` of the wrapped `model` (eval mode, no grad): the `ExportedProgram` that `export_program` saves
    (and returns) and `export_onnx` translates."""
    wrapper = ExportableDetector(model.eval(), raw).eval()
    with torch.no_grad():
        return torch.export.export(wrapper, _example_inputs(model, static_hw),
                                   dynamic_shapes=_dynamic_shapes(model, static_hw))


def export_program(model: nn.Module, path: str, *, raw: bool = False,
                   static_hw: Optional[Tuple[int, int]] = None, metadata: Optional[Dict[str, str]] = None):
    """`trace` the wrapped `model` and save the program to `path` (`torch.export.save`, metadata in its extra files
    as `metadata.json`). Returns the `ExportedProgram` (for `export_onnx(..., program=)`, which then need not trace
    again)."""
    program = trace(model, raw=raw, static_hw=static_hw)
    torch.export.save(program, path, extra_files={"metadata.json": json.dumps(metadata or {})})
    return program


def export_onnx(model: nn.Module, path: str, *, opset: int = DEFAULT_OPSET, raw: bool = False,
                static_hw: Optional[Tuple[int, int]] = None, metadata: Optional[Dict[str, str]] = None,
                program=None) -> None:
    """ONNX file at `path` (torch.onnx's dynamo exporter translating the wrapped `model`'s `ExportedProgram`:
    `program` if given, from `trace` with the same `raw` and `static_hw`, else traced here), with `metadata` in
    its `metadata_props`; checked by `onnx.checker`."""
    import onnx

    check_onnx_opset(opset, model)
    if program is None:
        program = trace(model, raw=raw, static_hw=static_hw)
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=opset, input_names=["images", "image_sizes"],
            output_names=list(output_names(raw)), optimize=True, verbose=False,
        )
    proto = onnx_program.model_proto
    written = {imp.domain: imp.version for imp in proto.opset_import}.get("", None)
    if written != opset:
        raise ExportError(f"--opset {opset}: the exporter wrote opset {written}")
    for key, value in dict(metadata or {}, **{"dab_detr.opset": str(opset)}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def export_model(model: nn.Module, path: str, fmt: str, *, opset: int = DEFAULT_OPSET, raw: bool = False,
                 static_hw: Optional[Tuple[int, int]] = None, metadata: Optional[Dict[str, str]] = None) -> None:
    """`fmt` is "onnx" or "exported_program"."""
    if fmt == "onnx":
        export_onnx(model, path, opset=opset, raw=raw, static_hw=static_hw, metadata=metadata)
    elif fmt == "exported_program":
        export_program(model, path, raw=raw, static_hw=static_hw, metadata=metadata)
    else:
        raise ExportError(f"--format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
