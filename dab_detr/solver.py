"""Optimizer helpers usable from LazyConfig files."""


class BackboneLRFactor:
    """`lr_factor_func` for detectron2's `get_default_optimizer_params`: parameters whose name starts with
    `prefix` train at `factor` × the base learning rate (DETR recipes: backbone lr = 0.1 × lr)."""

    def __init__(self, factor: float = 0.1, prefix: str = "backbone."):
        self.factor = factor
        self.prefix = prefix

    def __call__(self, name: str) -> float:
        return self.factor if name.startswith(self.prefix) else 1.0

    def __repr__(self):
        return f"BackboneLRFactor(factor={self.factor}, prefix={self.prefix!r})"
