#!/usr/bin/env python
"""Plot the anchor boxes a DAB-DETR checkpoint learned: every anchor centre as a point, and the boxes of a random
subset (as in the paper's figure), in the unit image (x to the right, y down).

    python tools/visualize_anchors.py output/synthetic/model_final.pth --output anchors.png
    python tools/visualize_anchors.py weights/dab_detr_r50.pth --config-file configs/dab_detr_r50_50ep.py \
        --output anchors.png --num-boxes 40

CHECKPOINT may be ours (trained or converted), an official DAB-DETR `.pth` or an HF file/folder: the anchors are
read from its state dict. With `--config-file` the checkpoint is instead loaded into that config's model (which
checks it fits) and the model's anchors are drawn. The logic lives in `dab_detr.visualization`.
"""
import argparse
import os
import sys
import warnings

# fvcore (imported with detectron2) scripts a function at import time, which torch now warns about on stderr
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from dab_detr.checkpoint.io import read_state_dict  # noqa: E402
from dab_detr.visualization import anchors_from_state_dict, build_inference_model, plot_anchors  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (or HF save_pretrained folder)")
    parser.add_argument("--output", required=True, metavar="PNG", help="picture to write")
    parser.add_argument("--config-file", default=None, metavar="FILE", help="load CHECKPOINT into this config's model")
    parser.add_argument("--num-boxes", type=int, default=30, help="how many anchors to draw as boxes (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset drawn as boxes")
    return parser


def _anchor_logits(args):
    if args.config_file:
        from dab_detr.config_checks import load_lazy_config

        cfg = load_lazy_config(args.config_file)
        cfg.train.init_checkpoint = args.checkpoint
        return build_inference_model(cfg).head.anchor_boxes().detach()
    return anchors_from_state_dict(read_state_dict(args.checkpoint), args.checkpoint)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        anchors = _anchor_logits(args).sigmoid()
        fig = plot_anchors(anchors, args.num_boxes, args.seed, title=os.path.basename(args.checkpoint))
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        fig.savefig(args.output)
    except (ValueError, OSError, KeyError) as e:  # DabDetrError subclasses ValueError / FileNotFoundError
        print(f"visualize_anchors.py: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {args.output}: {anchors.shape[0]} anchor centres, {min(args.num_boxes, anchors.shape[0])} boxes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
