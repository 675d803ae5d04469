#!/usr/bin/env python
"""Draw DAB-DETR predictions (boxes, class names, scores) on images, one PNG per image, with detectron2's
`Visualizer` and the class names stored in the checkpoint (checkpoints of tools/train_net.py carry them; for
converted weights, those of the config's test dataset). Runs on the CPU unless `--device` says otherwise.

    python tools/demo.py --config-file configs/dab_detr_r50_50ep.py --input "images/*.jpg" --output out/ \
        --confidence-threshold 0.5 train.init_checkpoint=weights/dab_detr_r50.pth
    python tools/demo.py --config-file configs/dab_detr_synthetic.py --dataset dab_synthetic_val --num-images 8 \
        --output output/synthetic/predictions train.init_checkpoint=output/synthetic/model_final.pth

Options may come before or after the KEY=VALUE config overrides. An image that cannot be read is reported by name
on stderr and the others are still drawn; the exit code is then 1.
The logic lives in `dab_detr.visualization`.
"""
import argparse
import sys
import warnings

# fvcore (imported with detectron2) scripts a function at import time, which torch now warns about on stderr
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.catalog import Metadata  # noqa: E402

import dab_detr  # noqa: E402,F401  (registers DABDETR; the synthetic config registers its datasets)
from dab_detr.class_metadata import inference_classes  # noqa: E402
from dab_detr.cli import add_overrides_argument, add_register_coco_argument, parse_args_with_overrides  # noqa: E402
from dab_detr.config_checks import apply_overrides_checked, load_lazy_config  # noqa: E402
from dab_detr.data.coco import register_coco_datasets  # noqa: E402
from dab_detr.errors import DatasetError  # noqa: E402
from dab_detr.visualization import Predictor, draw_files, expand_inputs  # noqa: E402



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="IMAGE", help="image files or globs (quote globs)")
    source.add_argument("--dataset", metavar="NAME", help="draw the first --num-images images of this dataset")
    parser.add_argument("--num-images", type=int, default=8, help="with --dataset: how many images (default 8)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs (created)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score drawn (default 0.5)")
    parser.add_argument("--device", default="cpu", help="device to run the model on (default cpu)")
    parser.add_argument("--scale", type=float, default=None,
                        help="drawing scale (default: enlarge images whose shorter side is under 512 pixels)")
    add_register_coco_argument(parser, "register a COCO-format dataset under NAME (for --dataset NAME; repeatable)")
    add_overrides_argument(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = parse_args_with_overrides(build_parser(), argv)
    if args.num_images < 1:
        build_parser().error(f"--num-images must be >= 1, got {args.num_images}")
    return args


def _setup(args):
    register_coco_datasets(args.register_coco)
    cfg = apply_overrides_checked(load_lazy_config(args.config_file), args.opts)
    metadata = Metadata(name="checkpoint", thing_classes=inference_classes(cfg))  # also sets model.num_classes
    if args.dataset:
        if args.dataset not in DatasetCatalog.list():
            raise DatasetError(f"--dataset {args.dataset!r} is not registered")
        files = [d["file_name"] for d in DatasetCatalog.get(args.dataset)[: args.num_images]]
        nothing = []
    else:
        files, nothing = expand_inputs(args.input)
    return cfg, metadata, files, nothing


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, metadata, files, nothing = _setup(args)
        predictor = Predictor(cfg, args.device)
    except (ValueError, OSError, KeyError) as e:  # DabDetrError subclasses ValueError / FileNotFoundError
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 1
    failures = len(nothing)
    for pattern in nothing:
        print(f"{pattern}: no such file", file=sys.stderr)
    for result in draw_files(predictor, files, args.output, metadata, args.confidence_threshold, args.scale):
        if result.error:
            failures += 1
            print(result.error, file=sys.stderr)
        else:
            print(f"{result.file} -> {result.output}: {result.num_drawn} detections >= {args.confidence_threshold}")
    if not files and not nothing:
        print("demo.py: error: no images to draw", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
