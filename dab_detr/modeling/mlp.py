"""The small MLP used for DAB-DETR's box head, `query_scale`, `ref_point_head` and `ref_anchor_head`.

Paper: DAB-DETR, Liu et al., ICLR 2022, arXiv 2201.12329 (docs/design.md)."""
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them: `(..., input_dim) -> (..., output_dim)`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x
