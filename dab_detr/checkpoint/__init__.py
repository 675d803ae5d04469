"""Weight converters into the `DABDETR` state-dict layout."""
from .hf import HFConversion, HFLoadResult, convert_hf_state_dict, load_hf_state_dict

__all__ = ["HFConversion", "HFLoadResult", "convert_hf_state_dict", "load_hf_state_dict"]
