#!/usr/bin/env python
"""Convert DAB-DETR / DAB-Deformable-DETR / ResNet weights into this project's format (a `.pth` for
`train.init_checkpoint=...`).

    # official DAB-DETR checkpoint (91 raw COCO ids -> detectron2's 80 classes), checked against its config
    python tools/convert_weights.py --source official checkpoint.pth weights/dab_detr_r50.pth \
        --config-file configs/dab_detr_r50_50ep.py
    # official DAB-Deformable-DETR checkpoint (recognised by its multi-scale keys)
    python tools/convert_weights.py --source official checkpoint.pth weights/dab_deformable_detr_r50.pth \
        --config-file configs/dab_deformable_detr_r50_50ep.py
    # detrex DAB-DETR or DAB-Deformable-DETR (single- or two-stage; 80 classes already)
    python tools/convert_weights.py --source detrex model_final.pth weights/dab_deformable_detr_r50_two_stage.pth \
        --config-file configs/dab_deformable_detr_r50_two_stage_50ep.py
    # HuggingFace DabDetrForObjectDetection: a save_pretrained folder or its model.safetensors / pytorch_model.bin
    python tools/convert_weights.py --source hf dab-detr-resnet-50/ weights/dab_detr_r50_hf.pth
    # DN-DETR (DN-DAB-DETR): official IDEA-Research/DN-DETR or detrex dn_detr, into the denoising config
    python tools/convert_weights.py --source dn_detr checkpoint.pth weights/dn_dab_detr_r50.pth \
        --config-file configs/dn_dab_detr_r50_50ep.py
    python tools/convert_weights.py --source detrex_dn_detr dn_detr_r50_50ep.pth weights/dn_dab_detr_r50.pth
    # torchvision ImageNet ResNet -> detectron2 backbone keys, the usual starting point for COCO training
    python tools/convert_weights.py --source torchvision resnet50-0676ba61.pth weights/R-50.pth

Errors (unreadable file, wrong kind of checkpoint, weights that do not fit the config) are one line on stderr and
exit code 1. The logic lives in `dab_detr.checkpoint`.
"""
import argparse
import sys
import warnings

# fvcore (imported with detectron2) scripts a function at import time, which torch now warns about on stderr
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from dab_detr.checkpoint.classes import parse_class_ids  # noqa: E402
from dab_detr.checkpoint.convert import SOURCES, convert_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, choices=SOURCES, help="what kind of checkpoint INPUT is")
    parser.add_argument("input", metavar="INPUT", help="checkpoint file, or a save_pretrained folder (--source hf)")
    parser.add_argument("output", metavar="OUTPUT", help="converted .pth to write (never the input)")
    parser.add_argument(
        "--class-ids", default="auto", type=parse_class_ids,
        help="classifier rows to keep: 'auto' (default: COCO's 91 raw ids -> 80 classes when there are 91 rows, "
        "else all), 'coco', 'all', or comma-separated row indices such as 1,2,3",
    )
    parser.add_argument(
        "--config-file", default=None,
        help="also check that the result loads exactly into this LazyConfig's model "
        "(e.g. configs/dab_detr_r50_50ep.py)",
    )
    parser.add_argument(
        "--no-strict", dest="strict", action="store_false",
        help="drop source keys with no place in our model (and, with --config-file, accept differences from it) "
        "with a warning instead of failing",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert_checkpoint(
            args.source, args.input, args.output, class_ids=args.class_ids, strict=args.strict,
            config_file=args.config_file,
        )
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; both carry a message naming the file
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 1
    for key in report.unused_keys:
        print(f"warning: dropped {key} (no place in a DAB-DETR model)", file=sys.stderr)
    for problem in report.model_problems:
        print(f"warning: {problem}", file=sys.stderr)
    classes = "backbone only" if report.num_classes is None else f"{report.num_classes} classes"
    checked = f", checked against {args.config_file}" if args.config_file else ""
    print(
        f"Wrote {report.output}: {report.num_tensors} tensors from {args.source} {args.input} ({classes}; "
        f"{len(report.ignored_keys)} source keys dropped on purpose{checked})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
