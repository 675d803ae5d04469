import pytest
import torch

from dab_detr.modeling.mlp import MLP


def test_mlp_has_relu_between_layers_but_not_after_the_last():
    mlp = MLP(3, 5, 2, num_layers=3)
    assert [(l.in_features, l.out_features) for l in mlp.layers] == [(3, 5), (5, 5), (5, 2)]
    x = torch.randn(4, 7, 3)
    h = torch.relu(mlp.layers[1](torch.relu(mlp.layers[0](x))))
    torch.testing.assert_close(mlp(x), mlp.layers[2](h))
    with torch.no_grad():  # a negative output survives: no ReLU at the end
        mlp.layers[2].bias.fill_(-100.0)
    assert (mlp(x) < 0).all()


def test_mlp_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        MLP(3, 5, 2, num_layers=0)
