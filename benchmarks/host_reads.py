"""Where a step reads device memory on the host: what would be a host-device sync on an accelerator, found on any
device, the CPU included (`count_host_reads`). `compare_hf.py` reports the count of a training step of each
model; `tests/test_host_reads.py` pins ours to the reads the design has."""
import contextlib
from typing import Callable, Iterable, List, Tuple

import torch

_aten = torch.ops.aten
# ops that read a tensor's values on the host: a scalar out, or an output whose size depends on the values
_HOST_READ_OPS = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
    _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.equal.default, _aten.is_nonzero.default,
    _aten.repeat_interleave.Tensor,
}
# indexing with a boolean mask runs a `nonzero` of the mask inside the op
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}


def _read_site() -> str:
    import traceback

    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward of {node.name()}"
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


def _names_a_device(args, kwargs) -> bool:
    """Whether `Tensor.to(*args, **kwargs)` names a device (a move), not only a dtype."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)


@contextlib.contextmanager
def count_host_reads(device_tensors):
    """Record every place where the body reads the values of a device tensor on the host: `.cpu()` / `.numpy()` /
    `.tolist()` of it, a scalar out of it (`.item()`, `bool()`, `float()`), an op whose output size depends on its
    values (`nonzero`, boolean-mask indexing, `repeat_interleave` by a tensor, ...). On a GPU each is a
    host-device sync; on the CPU it is found by following which tensors derive from `device_tensors` (a model's
    parameters and buffers) through every op, and from `.to(device)` (a move to the model's device; `.to(dtype)`
    alone is not one). Host copies must be spelled `.cpu()` to be seen: on the CPU `.to("cpu")` cannot be told
    from a move to the device. Yields the list of `(what, where)` it fills, `where` being `file:line` of the
    innermost frame outside torch, or "backward of <node>"."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    on_device = WeakIdKeyDictionary()
    for t in device_tensors:
        on_device[t] = True
    reads = []

    def is_device(x) -> bool:
        return isinstance(x, torch.Tensor) and x in on_device

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            inputs = tree_flatten((args, kwargs))[0]
            device = any(is_device(t) for t in inputs)
            if device and func in _HOST_READ_OPS:
                reads.append((func.__name__, _read_site()))
            elif func in _INDEX_OPS and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) and is_device(i) for i in args[1]
            ):
                reads.append((f"boolean mask in {func.__name__}", _read_site()))
            out = func(*args, **kwargs)
            if device:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        on_device[t] = True
            return out

    class Function(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "to" and args and isinstance(args[0], torch.Tensor) and _names_a_device(args[1:], kwargs):
                out = func(*args, **kwargs)
                on_device[out] = True
                return out
            if name in ("cpu", "numpy", "tolist") and args and is_device(args[0]):
                reads.append((f".{name}()", _read_site()))
                out = func(*args, **kwargs)
                if name == "cpu":  # a host copy; on the CPU `.cpu()` returns the tensor itself
                    out = out.clone() if out is args[0] else out
                    on_device.pop(out, None)
                return out
            return func(*args, **kwargs)

    with Function(), Dispatch():
        yield reads


def step_host_reads(step: Callable[[], object], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    inputs: Iterable[torch.Tensor]) -> List[Tuple[str, str]]:
    """The host reads of one call of `step` (a training step that has run before, so the optimizer's state exists),
    with the model's parameters and buffers, the optimizer's state tensors (its host-side step counts excepted) and
    `inputs` on the device."""
    state = [t for s in optimizer.state.values() for key, t in s.items() if key != "step" and torch.is_tensor(t)]
    with count_host_reads([*model.parameters(), *model.buffers(), *state, *inputs]) as reads:
        step()
    return reads
