"""Classifier rows: COCO's 91 raw category ids (official and HF checkpoints) -> detectron2's 80 contiguous classes.

The official code and HF index the classifier by raw COCO category id (91 rows, 11 of them never used);
detectron2's COCO metadata numbers the 80 "thing" categories 0..79 in id order. Converting keeps the rows of those
80 ids, in that order, so class `i` of the converted model is `MetadataCatalog.get("coco_2017_val").thing_classes[i]`.
"""
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

from .io import CheckpointError

__all__ = ["CLASSIFIER_KEYS", "NUM_COCO_IDS", "classifier_keys", "coco_thing_ids", "parse_class_ids",
           "resolve_class_ids", "select_classes"]

CLASSIFIER_KEYS = ("head.class_embed.weight", "head.class_embed.bias")
# other tensors with one row per class, selected like the classifier when present (denoising training)
PER_CLASS_KEYS = ("head.denoising.label_embed.weight",)
NUM_COCO_IDS = 91  # raw COCO category ids 0..90 (0 and 11 of the others unused)
ClassSpec = Union[None, str, Sequence[int]]
# DAB-DETR's one classifier, DAB-Deformable-DETR's per-decoder-layer ones and its two-stage proposal classifier
_CLASSIFIER = re.compile(r"head\.(class_embed(\.\d+)?|transformer\.enc_class_embed)\.weight")


def classifier_keys(state_dict: Mapping[str, Tensor]) -> List[Tuple[str, str]]:
    """(weight, bias) keys of every classifier in a state dict in our layout (sorted)."""
    return sorted((k, k[: -len("weight")] + "bias") for k in state_dict if _CLASSIFIER.fullmatch(k))


def coco_thing_ids() -> List[int]:
    """The 80 COCO thing category ids in detectron2's contiguous order (from detectron2's own metadata)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def parse_class_ids(text: str) -> ClassSpec:
    """Command-line form: `auto`, `coco`, `all` or comma-separated row indices (`1,2,3`)."""
    if text in ("auto", "coco", "all"):
        return text
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--class-ids: expected auto, coco, all or comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--class-ids: the list of class ids is empty")
    return ids


def resolve_class_ids(spec: ClassSpec, num_rows: int) -> Optional[List[int]]:
    """Rows of a `num_rows`-class classifier to keep, in order; None keeps them all.

    `"auto"` (or None): the COCO mapping when there are 91 rows, else all rows. `"coco"`: the COCO mapping (needs
    91 rows). `"all"`: every row. A list: exactly those rows (e.g. the COCO ids of the classes of a custom dataset).
    """
    if spec is None or spec == "auto":
        return coco_thing_ids() if num_rows == NUM_COCO_IDS else None
    if spec == "all":
        return None
    if spec == "coco":
        if num_rows != NUM_COCO_IDS:
            raise ValueError(
                f"class ids 'coco' maps {NUM_COCO_IDS} raw COCO ids to 80 classes, but the classifier has "
                f"{num_rows} rows (use 'all' to keep them)"
            )
        return coco_thing_ids()
    if isinstance(spec, str):
        raise ValueError(f"class ids must be 'auto', 'coco', 'all' or a list of ints, got {spec!r}")
    ids = [int(i) for i in spec]
    bad = [i for i in ids if not 0 <= i < num_rows]
    if bad:
        raise ValueError(f"class ids {bad} are outside the classifier's {num_rows} rows (0..{num_rows - 1})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"class ids {ids} contain duplicates")
    return ids


def select_classes(state_dict: Mapping[str, Tensor], spec: ClassSpec, source: str = "checkpoint"
                   ) -> Dict[str, Tensor]:
    """Keep the classifier rows chosen by `spec` (see `resolve_class_ids`) in a state dict in our layout."""
    pairs = classifier_keys(state_dict)
    if not pairs or any(bias not in state_dict for _, bias in pairs):
        raise CheckpointError(f"{source}: has no classifier ({CLASSIFIER_KEYS[0]}, {CLASSIFIER_KEYS[1]})")
    num_rows = state_dict[pairs[0][0]].shape[0]
    for weight_key, bias_key in pairs:
        if state_dict[weight_key].shape[0] != num_rows or state_dict[bias_key].shape[0] != num_rows:
            raise CheckpointError(
                f"{source}: classifier {weight_key} / {bias_key} has {state_dict[weight_key].shape[0]} / "
                f"{state_dict[bias_key].shape[0]} rows, expected {num_rows}"
            )
    for key in PER_CLASS_KEYS:
        if key in state_dict and state_dict[key].shape[0] != num_rows:
            raise CheckpointError(f"{source}: {key} has {state_dict[key].shape[0]} rows but the classifier {num_rows}")
    rows = resolve_class_ids(spec, num_rows)
    out = dict(state_dict)
    if rows is not None:
        for key in [k for pair in pairs for k in pair] + [k for k in PER_CLASS_KEYS if k in state_dict]:
            out[key] = state_dict[key][rows].clone()
    return out
