"""Small builders and utilities shared by the tests (import as `tests.helpers`)."""
import contextlib

import torch


# ---- threads (dedupe) ----
@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with `torch.set_num_threads(n)`, restoring the previous count after it.

    Tiny models run several times faster on one thread when the (2-core) machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- multi-scale inputs for the deformable heads ----
def tiny_multiscale_inputs(seed: int = 0):
    """Backbone maps at strides 4 and 8 of a 32x40 batch of 2 (8 and 16 channels); image 1 is 20x24 (padded right
    and bottom). Returns `([features...], pixel mask (2, 32, 40))`, True = padding."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 8, 8, 10, generator=g), torch.randn(2, 16, 4, 5, generator=g)]
    mask = torch.zeros(2, 32, 40, dtype=torch.bool)
    mask[1, 20:] = True
    mask[1, :, 24:] = True
    return feats, mask
