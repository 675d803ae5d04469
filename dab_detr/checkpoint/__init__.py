"""Weight converters into our state-dict layouts (`DABDETR`, `DABDeformableDETR`): official DAB-DETR and
DAB-Deformable-DETR, detrex, HuggingFace, torchvision ResNet."""
from .classes import coco_thing_ids, resolve_class_ids, select_classes
from .convert import SOURCES, ConversionReport, check_against_model, convert_checkpoint, convert_state_dict
from .deformable import convert_deformable_state_dict
from .detrex import convert_detrex_state_dict
from .hf import HFConversion, HFLoadResult, convert_hf_state_dict, load_hf_state_dict
from .io import CheckpointError, Conversion, load_checkpoint, read_state_dict, save_converted
from .official import convert_official_state_dict
from .torchvision import convert_torchvision_resnet, torchvision_resnet_key

__all__ = [
    "SOURCES",
    "CheckpointError",
    "Conversion",
    "ConversionReport",
    "HFConversion",
    "HFLoadResult",
    "check_against_model",
    "coco_thing_ids",
    "convert_checkpoint",
    "convert_deformable_state_dict",
    "convert_detrex_state_dict",
    "convert_hf_state_dict",
    "convert_official_state_dict",
    "convert_state_dict",
    "convert_torchvision_resnet",
    "load_checkpoint",
    "load_hf_state_dict",
    "read_state_dict",
    "resolve_class_ids",
    "save_converted",
    "select_classes",
    "torchvision_resnet_key",
]
