"""Random official DAB-DETR state dicts with exactly the keys and shapes of the reference key lists
(`reference/official_dab_detr_*_state_dict.tsv` next to this file: the state_dict of the official code's models,
copied from the project's shared reference notes)."""
import ast
import os

import torch

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
R50_TSV = "official_dab_detr_r50_state_dict.tsv"
R50_DC5_3PATTERNS_TSV = "official_dab_detr_r50_dc5_3patterns_state_dict.tsv"
DETREX_R50_TSV = "detrex_dab_detr_r50_state_dict.tsv"  # detrex's DAB-DETR layout (also its dn_detr's, + label encoder)


def official_state_dict(tsv_name: str, seed: int = 0):
    """Random tensors for every key of the list, with the official model's tied box head
    (`transformer.decoder.bbox_embed` is the same module as `bbox_embed`)."""
    path = os.path.join(REFERENCE, tsv_name)
    g = torch.Generator().manual_seed(seed)
    state = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or line.startswith("key\t") or not line.strip():
                continue
            key, shape = line.rstrip("\n").split("\t")
            state[key] = torch.randn(ast.literal_eval(shape), generator=g)
    tied = [k for k in state if k.startswith("transformer.decoder.bbox_embed.")]
    assert tied, f"{path} should list the decoder's copy of bbox_embed"
    for key in tied:
        state[key] = state[key.replace("transformer.decoder.", "")].clone()
    for key in [k for k in state if ".ffns.0.layers.0.1." in k]:  # detrex: the FFN's PReLU, registered twice
        state[key] = state[key.replace("ffns.0.layers.0.1.", "ffns.0.activation.")].clone()
    return state
