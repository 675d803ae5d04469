"""Pictures of a DAB-DETR model: its predictions on images (`tools/demo.py`) and its learned anchors
(`tools/visualize_anchors.py`).

Predictions go through the config's own test-time mapper and the model's own post-processing, and are drawn by
detectron2's `Visualizer` with the class names of the config's test dataset.
"""
import glob
import os
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DrawResult",
    "Predictor",
    "anchors_from_state_dict",
    "auto_scale",
    "build_inference_model",
    "draw_files",
    "draw_predictions",
    "expand_inputs",
    "output_names",
    "plot_anchors",
]


def build_inference_model(cfg, device: str = "cpu") -> nn.Module:
    """`cfg.model` in eval mode on `device`, with `cfg.train.init_checkpoint` loaded (it must be set)."""
    from detectron2.config import instantiate

    from .engine import DetrCheckpointer

    checkpoint = cfg.train.get("init_checkpoint", "")
    if not checkpoint:
        raise ValueError("train.init_checkpoint is empty: pass train.init_checkpoint=MODEL.pth "
                         "(a trained or converted checkpoint)")
    cfg.model.criterion = None  # inference only
    model = instantiate(cfg.model).to(device).eval()
    DetrCheckpointer(model).load(checkpoint)
    return model


class Predictor:
    """Image file -> `Instances` (boxes in the file's pixel coordinates, on the CPU) with the config's test-time
    mapper (resize, colour format) and the model loaded from `cfg.train.init_checkpoint`."""

    def __init__(self, cfg, device: str = "cpu"):
        from detectron2.config import instantiate

        self.model = build_inference_model(cfg, device)
        self.mapper = instantiate(cfg.dataloader.test.mapper)

    @torch.no_grad()
    def __call__(self, file_name: str):
        inputs = self.mapper({"file_name": file_name})  # fills in the original height/width
        return self.model([inputs])[0]["instances"].to("cpu")


def auto_scale(height: int, width: int, min_side: int = 512) -> float:
    """Upscale factor so the shorter side is drawn with at least `min_side` pixels (labels stay legible on the
    128-pixel synthetic images); 1 for images that are large enough."""
    return max(1.0, min_side / max(1, min(height, width)))


def draw_predictions(image_rgb: np.ndarray, instances, metadata, confidence_threshold: float = 0.5,
                     scale: Optional[float] = None) -> Tuple[np.ndarray, int]:
    """Boxes, class names and scores of the `instances` scoring at least `confidence_threshold`, drawn on the
    `(H, W, 3)` uint8 RGB image by detectron2's `Visualizer`. Returns the drawn RGB image and the number drawn.

    Each class keeps one colour (detectron2's palette), in every image and every run; `draw_instance_predictions`
    would pick random colours."""
    from detectron2.utils.colormap import colormap
    from detectron2.utils.visualizer import Visualizer

    keep = instances[instances.scores >= confidence_threshold]
    if scale is None:
        scale = auto_scale(*image_rgb.shape[:2])
    classes, scores = keep.pred_classes.tolist(), keep.scores.tolist()
    names = metadata.get("thing_classes", None) or [str(c) for c in range(max(classes, default=-1) + 1)]
    palette = colormap(rgb=True, maximum=1)
    visualizer = Visualizer(image_rgb, metadata, scale=scale)
    drawn = visualizer.overlay_instances(
        boxes=keep.pred_boxes.tensor.numpy(),
        labels=[f"{names[c]} {s * 100:.0f}%" for c, s in zip(classes, scores)],  # detectron2's label format
        assigned_colors=[palette[c % len(palette)] for c in classes],
    )
    return drawn.get_image(), len(keep)


def expand_inputs(patterns: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Files named by `patterns` (file names or globs), in order and without repeats; and the patterns that name
    nothing."""
    files: List[str] = []
    nothing: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(m for m in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(m))
        else:  # a plain name is kept even if missing: reading it reports the problem by name
            matches = [pattern]
        if not matches:
            nothing.append(pattern)
        files += [m for m in matches if m not in files]
    return files, nothing


def output_names(files: Sequence[str], output_dir: str) -> Dict[str, str]:
    """`<output_dir>/<file stem>.png` per file; a stem seen before gets `_<n>` so no picture overwrites another."""
    names: Dict[str, str] = {}
    used = set()
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0] or "image"
        name, n = stem, 1
        while name in used:
            name, n = f"{stem}_{n}", n + 1
        used.add(name)
        names[f] = os.path.join(output_dir, name + ".png")
    return names


class DrawResult(NamedTuple):
    file: str
    output: Optional[str]  # the PNG written, None if the image could not be drawn
    num_drawn: int
    error: Optional[str]  # why the image could not be drawn, naming the file


def draw_files(predictor: Predictor, files: Sequence[str], output_dir: str, metadata,
               confidence_threshold: float = 0.5, scale: Optional[float] = None) -> Iterator[DrawResult]:
    """Predict and draw each file into `output_dir/<stem>.png`; a file that cannot be read is reported in its
    `DrawResult.error` and the others are still drawn."""
    from PIL import Image

    from .data.mapper import read_image  # the model's reader: 16-bit images scaled, not clipped to white

    os.makedirs(output_dir, exist_ok=True)
    for file, output in output_names(files, output_dir).items():
        try:
            instances = predictor(file)
            image = read_image(file, format="RGB")
        except (OSError, ValueError) as e:  # missing, not an image, truncated (PIL raises OSError subclasses)
            message = str(e) if file in str(e) else f"{file}: cannot read the image ({type(e).__name__}: {e})"
            yield DrawResult(file, None, 0, message)
            continue
        drawn, count = draw_predictions(image, instances, metadata, confidence_threshold, scale)
        Image.fromarray(drawn).save(output)
        yield DrawResult(file, output, count, None)


# -- anchors ----------------------------------------------------------------------------------------------------

_ANCHOR_KEYS = (
    "head.anchor_box_embed.weight",  # ours
    "refpoint_embed.weight",  # official DAB-DETR
    "model.query_refpoint_embeddings.weight",  # HuggingFace
)


def anchors_from_state_dict(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> Tensor:
    """The anchor logits `(num_queries, 4)` (cxcywh before the sigmoid) of a checkpoint in our, the official or
    HF's layout (ours may store them split as `head.anchor_xy` + `head.anchor_wh`)."""
    for key in _ANCHOR_KEYS:
        if key in state_dict:
            return state_dict[key].float()
    if "head.anchor_xy" in state_dict and "head.anchor_wh" in state_dict:
        return torch.cat((state_dict["head.anchor_xy"], state_dict["head.anchor_wh"]), dim=1).float()
    raise ValueError(f"{source}: no anchors found (looked for {', '.join(_ANCHOR_KEYS)}, head.anchor_xy/anchor_wh)")


def plot_anchors(anchors: Tensor, num_boxes: int = 30, seed: int = 0, title: str = ""):
    """A matplotlib `Figure` of learned anchors `(Q, 4)` (sigmoid-space cxcywh, in [0, 1]), as in the paper's
    figure: left, every anchor centre as a point; right, the boxes of `num_boxes` anchors picked at random (with
    `seed`). Both panels are the unit image, y pointing down."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if anchors.dim() != 2 or anchors.shape[1] != 4:
        raise ValueError(f"plot_anchors: anchors must be (num_queries, 4), got {tuple(anchors.shape)}")
    anchors = anchors.detach().float().cpu()
    num_queries = anchors.shape[0]
    picked = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed))[:max(0, num_boxes)]
    picked = picked.sort().values

    fig = Figure(figsize=(10, 5.4), dpi=100)
    ax_centres, ax_boxes = fig.subplots(1, 2)
    ax_centres.scatter(anchors[:, 0].numpy(), anchors[:, 1].numpy(), s=6, c="tab:blue")
    ax_centres.set_title(f"centres of all {num_queries} anchors")
    colours = [f"C{i % 10}" for i in range(len(picked))]
    for colour, i in zip(colours, picked.tolist()):
        cx, cy, w, h = anchors[i].tolist()
        ax_boxes.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, edgecolor=colour, linewidth=1.2))
    ax_boxes.scatter(anchors[picked, 0].numpy(), anchors[picked, 1].numpy(), s=10, c=colours)
    ax_boxes.set_title(f"boxes of {len(picked)} anchors (random subset)")
    for ax in (ax_centres, ax_boxes):
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image coordinates: y grows downwards
        ax.set_aspect("equal")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    if title:
        fig.suptitle(title)
    return fig
