#!/usr/bin/env python
"""Check a COCO-format detection dataset before training on it.

    python tools/check_dataset.py annotations.json images/

Runs the checks `tools/train_net.py --register-coco` runs before training (dab_detr/data/validate.py): the json's
structure, ids and category ids, image sizes and boxes, and that every image file exists. Prints a summary and the
number of boxes training will clip to their image or drop; exit status 1 with a one-line error naming the file and
the entry at the first problem.
"""
import argparse
import logging
import sys
import warnings

# fvcore (imported with detectron2) scripts a function at import time, which torch now warns about on stderr
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from dab_detr.data.validate import validate_coco_json  # noqa: E402
from dab_detr.errors import DabDetrError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_file", metavar="JSON", help="COCO-format annotation file")
    parser.add_argument("image_root", metavar="IMAGE_ROOT", help="folder the images' file_name are relative to")
    parser.add_argument("--skip-files", action="store_true", help="do not check that the image files exist")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        report = validate_coco_json(args.json_file, args.image_root, check_files=not args.skip_files)
    except DabDetrError as e:
        print(f"check_dataset.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.json_file}: OK: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
