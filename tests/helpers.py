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
