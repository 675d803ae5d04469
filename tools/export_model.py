#!/usr/bin/env python
"""Export a trained model to ONNX or to a torch.export program (`.pt2`) that runs on plain tensors.

    python tools/export_model.py --config-file configs/dab_detr_r50_50ep.py --format onnx --output model.onnx \
        train.init_checkpoint=output/dab_detr_r50/model_final.pth
    python tools/export_model.py --config-file CFG --format exported_program --output model.pt2 \
        train.init_checkpoint=model_final.pth --static 800x1216

Inputs of the exported graph: `images (B, 3, H, W)` float RGB in 0..255 (images of a batch zero-padded at the
bottom/right to the largest) and `image_sizes (B, 2)` int64 (height, width). Outputs: `boxes (B, K, 4)` absolute
xyxy in each image's own size, `scores (B, K)`, `labels (B, K)`; with --raw the head's `pred_logits (B, Q, C)` and
`pred_boxes (B, Q, 4)` (sigmoid cxcywh, relative). Batch, height and width are dynamic unless --static HxW.
Class names (from the checkpoint) are stored in the file's metadata (ONNX) or in `metadata.json` of the `.pt2`.
The graph does not resize: resize as the config's test mapper does (tools/onnx_infer.py reads the size from the
metadata). Options may come before or after the KEY=VALUE config overrides.
"""
import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

import dab_detr  # noqa: E402,F401  (registers DABDETR)
from dab_detr.class_metadata import inference_classes  # noqa: E402
from dab_detr.cli import add_overrides_argument, add_register_coco_argument, parse_args_with_overrides  # noqa: E402
from dab_detr.config_checks import apply_overrides_checked, load_lazy_config  # noqa: E402
from dab_detr.data.coco import register_coco_datasets  # noqa: E402
from dab_detr.export import (  # noqa: E402
    DEFAULT_OPSET,
    FORMATS,
    export_metadata,
    export_model,
    parse_static_size,
    inference_resize_of,
)
from dab_detr.visualization import build_inference_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the model")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or exported_program (.pt2)")
    parser.add_argument("--output", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; onnx only)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--dynamic", action="store_true", default=True,
                       help="dynamic batch, height and width (the default)")
    shape.add_argument("--static", metavar="HxW", default=None, help="fixed height x width, e.g. 800x1216")
    parser.add_argument("--raw", action="store_true", help="output the head's logits and boxes, no post-processing")
    add_register_coco_argument(
        parser, "register a COCO-format dataset (for checkpoints that store no class names; repeatable)"
    )
    add_overrides_argument(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args_with_overrides(parser, argv)
    if args.format != "onnx" and args.opset != DEFAULT_OPSET:
        parser.error(f"--opset {args.opset} applies to --format onnx only")
    try:
        static_hw = parse_static_size(args.static) if args.static else None
        register_coco_datasets(args.register_coco)
        cfg = apply_overrides_checked(load_lazy_config(args.config_file), args.opts)
        classes = inference_classes(cfg)  # sets model.num_classes to the checkpoint's
        resize = inference_resize_of(cfg)
        model = build_inference_model(cfg, "cpu")
        metadata = export_metadata(model, classes, args.raw, resize)
        export_model(model, args.output, args.format, opset=args.opset, raw=args.raw, static_hw=static_hw,
                     metadata=metadata)
    except (ValueError, OSError, KeyError) as e:  # ExportError and DabDetrError subclass these
        print(f"export_model.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({args.format}, {len(classes)} classes"
          f"{', opset ' + str(args.opset) if args.format == 'onnx' else ''}, "
          f"{'static ' + args.static if args.static else 'dynamic batch/height/width'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
