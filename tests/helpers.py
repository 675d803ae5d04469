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


# ---- configs/dab_detr_synthetic.py shrunk (dedupe) ----
# Command-line overrides that make the synthetic DAB-DETR config a model that trains a step in ~50 ms; callers add
# their own on top (later overrides win). Two decoder layers: with one, the decoder's `query_scale` MLP gets no
# gradient and DDP (find_unused_parameters=False) refuses to run.
TINY_SYNTHETIC_OVERRIDES = (
    "model.backbone.stem.out_channels=8", "model.backbone.stages.stem_width=8",
    "model.backbone.stages.widths=[8,16,32]", "model.head.hidden_dim=32", "model.head.nheads=4",
    "model.head.num_encoder_layers=1", "model.head.num_decoder_layers=2", "model.head.dim_feedforward=64",
)


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


# ---- denoising training, both heads ----
def random_target_batch(sizes, num_classes: int, seed: int = 0):
    """A checked `TargetBatch` of `sizes[b]` random targets per image: boxes (cx, cy, w, h) with centres in
    [0.25, 0.75] and sizes in [0.1, 0.4]."""
    from dab_detr.modeling.targets import check_target_batch

    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    labels = torch.randint(0, num_classes, (total,), generator=g)
    centres = torch.rand(total, 2, generator=g) * 0.5 + 0.25
    boxes = torch.cat((centres, torch.rand(total, 2, generator=g) * 0.3 + 0.1), 1)
    return check_target_batch(labels, boxes, sizes, num_classes)


def assert_dn_checkpoint_loads_into_plain_head(make_head, caplog):
    """`make_head(dn: bool)` builds a head. A `dn=True` state dict loads strictly into a `dn=False` head, its
    training-only label embedding dropped with a log line; the other way round only that key is missing."""
    import logging

    dn_state = make_head(True).state_dict()
    plain = make_head(False)
    with caplog.at_level(logging.INFO, logger="dab_detr.modeling.denoising"):
        plain.load_state_dict(dn_state)  # strict
    assert "denoising.label_embed.weight" in caplog.text
    result = make_head(True).load_state_dict(make_head(False).state_dict(), strict=False)
    assert result.missing_keys == ["denoising.label_embed.weight"] and not result.unexpected_keys


def assert_label_embedding_gradient(head, has_targets: bool):
    """After a backward: the denoising label embedding is in the graph every step (DDP needs it), with a finite
    gradient that is nonzero exactly when the batch had targets."""
    grad = head.denoising.label_embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert bool(grad.any()) == has_targets


# ---- host reads of device memory (what would be a host-device sync on an accelerator) ----
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
    from a move to the device. Yields the list of `(what, where)` it fills, `where` being `file:line` of the innermost frame
    outside torch, or "backward of <node>"."""
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
