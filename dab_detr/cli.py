"""Command lines of the tools: options anywhere, KEY=VALUE config overrides anywhere, never mixed up.

`python tools/X.py --config-file CFG a.b=1 --flag c.d=2` and `... --flag a.b=1 c.d=2` mean the same. A token is an
override when it looks like `key.path=value` (a dotted identifier, then `=`) and is not an existing file; a token
that starts with `-` is always an option. Anything else left over is an error that names it.
"""
import argparse
import os
import re
import sys
from typing import List, Optional, Sequence

__all__ = ["OVERRIDE", "add_overrides_argument", "add_register_coco_argument", "is_override",
           "parse_args_with_overrides"]

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def is_override(token: str) -> bool:
    return bool(OVERRIDE.match(token)) and not os.path.exists(token)


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                              dest: str = "opts") -> argparse.Namespace:
    """Parse `argv` (default `sys.argv[1:]`) with `parser`, after taking out the KEY=VALUE overrides (in order)
    into `args.<dest>`; `parser` may declare `dest` as a positional (its help text is kept) or not at all."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: List[str] = [a for a in argv if is_override(a)]
    rest = [a for a in argv if not is_override(a)]
    args = parser.parse_args(rest)
    strays = [a for a in (getattr(args, dest, None) or [])]
    if strays:
        parser.error(f"unrecognized argument {strays[0]!r}: config overrides look like key.path=value")
    setattr(args, dest, overrides)
    return args


def add_register_coco_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """`--register-coco NAME JSON IMAGE_ROOT`, repeatable, into `args.register_coco` (a list of triples) for
    `dab_detr.data.coco.register_coco_datasets`; `help` says what the tool uses the dataset for."""
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"), help=help)


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """The `opts` positional (KEY=VALUE config overrides) that `parse_args_with_overrides` fills, for `--help`."""
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.init_checkpoint=X.pth (before or after the options)")
