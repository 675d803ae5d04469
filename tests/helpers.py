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


# ---- detectron2 inputs (what the dataset mapper gives a meta-architecture) ----
def uint8_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A random `(3, h, w)` uint8 image."""
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def training_inputs(sizes, boxes, classes):
    """detectron2 training inputs: image i is `uint8_image(*sizes[i], seed=i)` with `Instances` of `boxes[i]` (abs
    xyxy, a list of 4-lists) and `classes[i]`."""
    from detectron2.structures import Boxes, Instances

    inputs = []
    for i, ((h, w), image_boxes, image_classes) in enumerate(zip(sizes, boxes, classes)):
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor(image_boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.tensor(image_classes, dtype=torch.int64)
        inputs.append({"image": uint8_image(h, w, i), "instances": instances})
    return inputs

