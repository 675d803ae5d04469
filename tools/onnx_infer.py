#!/usr/bin/env python
"""Detect objects with an exported ONNX model (tools/export_model.py) and draw them: onnxruntime, numpy and
Pillow only — no torch, no detectron2.

    python tools/onnx_infer.py images/*.jpg --model model.onnx --output out/ --confidence-threshold 0.5

Each image is resized as the model's config does at test time (stored in the file's metadata), run alone, and
drawn with the class names of the metadata into `DIR/<stem>.png`; all detections (boxes in the image's own pixels)
also go to `DIR/detections.json`. An image that cannot be read is named on stderr, the others are still drawn,
and the exit code is then 1.
"""
import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont, ImageOps

# Distinct colours, one per class (cycled).
PALETTE = [(0, 114, 189), (217, 83, 25), (237, 177, 32), (126, 47, 142), (119, 172, 48), (77, 190, 238),
           (162, 20, 47), (255, 127, 0), (0, 170, 127), (170, 0, 255)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--model", required=True, metavar="FILE", help="ONNX file written by tools/export_model.py")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs (created)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score drawn (default 0.5)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: its own)")
    return parser


class OnnxDetector:
    """An exported detector: `__call__(rgb (H, W, 3) uint8)` -> boxes `(N, 4)` xyxy in the image's pixels,
    scores `(N,)`, labels `(N,)`, best first (boxes that the clipping to the image emptied are dropped)."""

    def __init__(self, path: str, threads: int = 0):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("dab_detr.outputs") != "detections":
            raise ValueError(f"{path}: not a detections model (exported with --raw, or not by tools/export_model.py)")
        self.class_names = json.loads(meta["dab_detr.class_names"]) if "dab_detr.class_names" in meta else None
        self.resize = json.loads(meta["dab_detr.test_resize"]) if "dab_detr.test_resize" in meta else None

    def input_size(self, height: int, width: int):
        """The size the config's test-time `ResizeShortestEdge` gives (same rounding), or the size itself."""
        if self.resize is None:
            return height, width
        short, max_size = self.resize["short_edge"], self.resize["max_size"]
        scale = short / min(height, width)
        new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
        if max(new_h, new_w) > max_size:
            scale = max_size / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        return int(new_h + 0.5), int(new_w + 0.5)

    def __call__(self, image: Image.Image):
        width, height = image.size
        in_h, in_w = self.input_size(height, width)
        resized = image if (in_h, in_w) == (height, width) else image.resize((in_w, in_h), Image.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)[None]
        sizes = np.array([[in_h, in_w]], dtype=np.int64)
        boxes, scores, labels = (x[0] for x in self.session.run(None, {"images": pixels, "image_sizes": sizes}))
        boxes = boxes * np.array([width / in_w, height / in_h] * 2, dtype=np.float32)
        boxes = np.minimum(np.maximum(boxes, 0), np.array([width, height] * 2, dtype=np.float32))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep], scores[keep], labels[keep]


def draw(image: Image.Image, boxes, scores, labels, class_names, min_side: int = 512) -> Image.Image:
    """Boxes with `name score%` labels; small images are enlarged so that the labels stay legible."""
    scale = max(1.0, min_side / max(1, min(image.size)))
    canvas = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for box, score, label in zip(boxes, scores, labels):
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        pen.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        name = class_names[int(label)] if class_names and int(label) < len(class_names) else str(int(label))
        text = f"{name} {score * 100:.0f}%"
        left, top, right, bottom = pen.textbbox((x0, y0), text, font=font)
        pen.rectangle((left, top - (bottom - top) - 2, right + 2, top), fill=colour)
        pen.text((x0 + 1, y0 - (bottom - top) - 2), text, fill=(255, 255, 255), font=font)
    return canvas


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"onnx_infer.py: error: --model {args.model}: no such file", file=sys.stderr)
        return 1
    try:
        detector = OnnxDetector(args.model, args.threads)
    except Exception as e:  # onnxruntime's errors derive from Exception only
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"onnx_infer.py: error: {first_line}", file=sys.stderr)
        return 1
    os.makedirs(args.output, exist_ok=True)
    failures, results, used = 0, {}, set()
    for file in args.images:
        try:
            with Image.open(file) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, ValueError) as e:
            print(f"{file}: cannot read the image ({type(e).__name__}: {e})", file=sys.stderr)
            failures += 1
            continue
        boxes, scores, labels = detector(image)
        results[file] = [
            {"box": [round(float(v), 3) for v in b], "score": float(s), "label": int(c),
             "class": detector.class_names[int(c)] if detector.class_names else str(int(c))}
            for b, s, c in zip(boxes, scores, labels)
        ]
        shown = scores >= args.confidence_threshold
        stem = os.path.splitext(os.path.basename(file))[0] or "image"
        name, n = stem, 1
        while name in used:
            name, n = f"{stem}_{n}", n + 1
        used.add(name)
        output = os.path.join(args.output, name + ".png")
        draw(image, boxes[shown], scores[shown], labels[shown], detector.class_names).save(output)
        print(f"{file} -> {output}: {int(shown.sum())} detections >= {args.confidence_threshold}")
    with open(os.path.join(args.output, "detections.json"), "w") as f:
        json.dump(results, f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
