"""One entry point for `tools/convert_weights.py`: read a checkpoint, convert it, optionally check it against a
config's model, and write it atomically.

    convert_checkpoint("official", "checkpoint.pth", "dab_detr_r50.pth",
                       config_file="configs/dab_detr_r50_50ep.py")
"""
from typing import Dict, List, Mapping, NamedTuple, Optional

from torch import Tensor, nn

from .classes import CLASSIFIER_KEYS, ClassSpec, select_classes
from .hf import convert_hf_state_dict
from .io import CheckpointError, Conversion, preview, read_state_dict, save_converted
from .official import convert_official_state_dict
from .torchvision import convert_torchvision_resnet

__all__ = ["SOURCES", "ConversionReport", "check_against_model", "convert_checkpoint", "convert_state_dict",
           "guess_source"]

SOURCES = ("official", "hf", "torchvision")


class ConversionReport(NamedTuple):
    output: str
    num_tensors: int
    num_classes: Optional[int]  # classifier rows written; None for a backbone-only checkpoint
    unused_keys: List[str]  # source keys dropped because they map to nothing (only without strict)
    ignored_keys: List[str]  # source keys dropped on purpose
    model_problems: List[str]  # differences from the config's model (only without strict)


_LOOKS_LIKE = {
    "ours": "a checkpoint already in our format (load it directly with train.init_checkpoint=...)",
    "official": "an official DAB-DETR checkpoint (--source official)",
    "hf": "a HuggingFace checkpoint (--source hf)",
    "torchvision": "a torchvision ResNet checkpoint (--source torchvision)",
}


def guess_source(keys) -> Optional[str]:
    """Which layout a state dict has ("ours" or one of `SOURCES`), from a few tell-tale keys; None if unknown."""
    keys = set(keys)
    if any(k.startswith(("head.", "backbone.res", "backbone.stem.")) for k in keys):
        return "ours"
    if "refpoint_embed.weight" in keys or any(k.startswith("backbone.0.body.") for k in keys):
        return "official"
    if any(k.startswith(("model.query_refpoint_embeddings.", "bbox_predictor.", "model.backbone.")) for k in keys):
        return "hf"
    if "layer1.0.conv1.weight" in keys:
        return "torchvision"
    return None


def convert_state_dict(source: str, state_dict: Mapping[str, Tensor], class_ids: ClassSpec = "auto",
                       path: str = "checkpoint") -> Conversion:
    """Convert a `source` state dict into our layout and pick its classifier rows (`classes.resolve_class_ids`).

    An input none of whose keys belong to `source` is an error that says what the file looks like instead.
    """
    if source == "official":
        conversion = convert_official_state_dict(state_dict)
    elif source == "hf":
        conversion = Conversion(*convert_hf_state_dict(state_dict))
    elif source == "torchvision":
        if class_ids not in (None, "auto"):
            raise ValueError("class ids do not apply to --source torchvision (an ImageNet backbone has no detector "
                             "classifier)")
        conversion = convert_torchvision_resnet(state_dict)
    else:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not conversion.state_dict:
        guess = guess_source(state_dict)
        hint = f"; it looks like {_LOOKS_LIKE[guess]}" if guess and guess != source else ""
        raise CheckpointError(
            f"{path}: none of its {len(state_dict)} keys is a {source} DAB-DETR/ResNet key "
            f"(e.g. {preview(list(state_dict))}){hint}"
        )
    if source != "torchvision":
        if not all(k in conversion.state_dict for k in CLASSIFIER_KEYS):
            raise CheckpointError(f"{path}: a {source} checkpoint without a classifier (class_embed) "
                                  f"is not a DAB-DETR checkpoint")
        conversion = conversion._replace(state_dict=select_classes(conversion.state_dict, class_ids, path))
    return conversion


def _build_model(config_file: str, num_classes: Optional[int], backbone_only: bool) -> nn.Module:
    from detectron2.config import instantiate

    from ..config_checks import load_lazy_config

    cfg = load_lazy_config(config_file)
    if backbone_only:
        return nn.ModuleDict({"backbone": instantiate(cfg.model.backbone)})
    if num_classes is not None:
        cfg.model.num_classes = num_classes  # the class count is the dataset's business; the architecture is ours
    cfg.model.criterion = None
    return instantiate(cfg.model)


def check_against_model(state_dict: Mapping[str, Tensor], model: nn.Module, backbone_only: bool = False
                        ) -> List[str]:
    """Every way `state_dict` fails to load into `model` exactly (empty when `load_state_dict(strict=True)` would
    succeed). `backbone_only`: only the model's `backbone.*` keys need to be provided."""
    expected = model.state_dict()
    problems = [
        f"shape of {k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    loadable = {k: v for k, v in state_dict.items() if k not in expected or v.shape == expected[k].shape}
    try:  # the model's own load hooks run here (the head splits anchors for freeze_anchor_xy)
        result = model.load_state_dict(loadable, strict=False)
    except RuntimeError as e:
        return problems + [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if backbone_only:
        missing = [k for k in missing if k.startswith("backbone.")]
    if missing:
        problems.append(f"model keys the checkpoint lacks: {preview(missing)}")
    if result.unexpected_keys:
        problems.append(f"checkpoint keys the model lacks: {preview(list(result.unexpected_keys))}")
    return problems


def convert_checkpoint(source: str, input_path: str, output: str, *, class_ids: ClassSpec = "auto",
                       strict: bool = True, config_file: Optional[str] = None) -> ConversionReport:
    """Convert the `source` checkpoint at `input_path` (file or `save_pretrained` folder) and write `output`.

    With `strict` (the default) a source key with no place in our model is an error, and so is any difference from
    `config_file`'s model (missing, unexpected or differently shaped tensors); without it they are reported in the
    returned `ConversionReport` and the rest is written.
    """
    state_dict = read_state_dict(input_path)
    conversion = convert_state_dict(source, state_dict, class_ids, input_path)
    if conversion.unused_keys and strict:
        guess = guess_source(state_dict)
        hint = f" It looks like {_LOOKS_LIKE[guess]}." if guess and guess != source else ""
        raise CheckpointError(
            f"{input_path}: {len(conversion.unused_keys)} of its keys have no place in a DAB-DETR model "
            f"({preview(conversion.unused_keys)}).{hint} Use --no-strict to drop them."
        )
    converted = conversion.state_dict
    num_classes = converted[CLASSIFIER_KEYS[0]].shape[0] if CLASSIFIER_KEYS[0] in converted else None
    problems: List[str] = []
    if config_file:
        backbone_only = source == "torchvision"
        model = _build_model(config_file, num_classes, backbone_only)
        problems = check_against_model(converted, model, backbone_only)
        if problems and strict:
            raise CheckpointError(
                f"{input_path}: converted weights do not fit the model of {config_file}: {'; '.join(problems)}"
            )
    metadata: Dict[str, object] = {"source": source, "input": input_path, "num_classes": num_classes}
    save_converted(converted, output, source_path=input_path, metadata=metadata)
    return ConversionReport(output, len(converted), num_classes, conversion.unused_keys, conversion.ignored_keys,
                            problems)
