"""Where a training step reads device memory on the host (each read is a host-device sync on a GPU), counted on the
CPU with `benchmarks.host_reads.count_host_reads`: only at the reads the design has, and no more with more decoder
layers or images. And the GIoU loss that made ten of them per step, rewritten without them."""
import collections
import itertools
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage
from torchvision.ops import generalized_box_iou_loss as torchvision_giou_loss

from benchmarks.host_reads import count_host_reads, step_host_reads
from dab_detr.engine.trainer import DetrTrainer
from dab_detr.modeling.box_ops import generalized_box_iou_loss
from tests.helpers import TINY_SYNTHETIC_OVERRIDES, torch_threads, training_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFORMABLE = ["model.head.num_encoder_layers=1", "model.head.num_decoder_layers=2", "model.head.hidden_dim=32",
              "model.head.nheads=4", "model.head.dim_feedforward=64"]
MODELS = {
    "dab_detr": ("dab_detr_synthetic.py", [*TINY_SYNTHETIC_OVERRIDES]),
    "dn_dab_detr": ("dn_dab_detr_synthetic.py", [*TINY_SYNTHETIC_OVERRIDES]),
    "deformable": ("dab_deformable_detr_synthetic.py", DEFORMABLE),
    "dn_deformable_two_stage": ("dab_deformable_detr_synthetic.py",
                                [*DEFORMABLE, "model.head.dn=True", "model.head.two_stage=True",
                                 "model.head.anchor_init=null"]),
}
# Per training step (forward, losses, backward, clipping, optimizer step): the matcher's one copy of its cost to the
# host (all decoder layers and two-stage's encoder proposals at once), and the trainer's one copy of the loss terms,
# the gradient norm and the finiteness flag after the backward. The targets are checked on the host, before they
# move to the device.
DESIGNED = {"matcher.py": 1, "trainer.py": 1}


def _model(name: str, *extra: str):
    config, overrides = MODELS[name]
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", config))
    cfg = LazyConfig.apply_overrides(cfg, [*overrides, "model.head.num_queries=10", *extra])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def _batch(num_images: int):
    """Images of a few sizes with one or two boxes each."""
    boxes, classes = [[4.0, 6.0, 30.0, 40.0], [10.0, 2.0, 50.0, 30.0]], [1, 3]
    sizes = [(64 + 16 * (i % 2), 96 - 16 * (i % 3)) for i in range(num_images)]
    counts = [1 + i % 2 for i in range(num_images)]
    return training_inputs(sizes, [boxes[:n] for n in counts], [classes[:n] for n in counts])


def _step_reads(model, num_images: int):
    """Host reads of the second `DetrTrainer` step (the first creates the optimizer's state). On the device before
    the step: the model and the optimizer's state. The loader's batch is host memory; the meta-architecture's
    `.to(device)` is what moves it (the counter follows that)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [_batch(num_images), _batch(num_images)]
    trainer = DetrTrainer(model, itertools.cycle(batches), optimizer, clip_max_norm=0.1, seed=0)
    with EventStorage(0), torch_threads(1):
        trainer.iter = 0
        trainer.run_step()
        trainer.iter = 1
        return step_host_reads(trainer.run_step, model, optimizer, inputs=[])


def _by_file(reads):
    return collections.Counter(where.split(":")[0] for _, where in reads)


@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_reads_the_device_only_where_designed(name):
    reads = _step_reads(_model(name), num_images=2)
    assert _by_file(reads) == DESIGNED, reads


@pytest.mark.parametrize("name", ["dn_dab_detr", "dn_deformable_two_stage"])
def test_more_decoder_layers_and_images_add_no_reads(name):
    few = _step_reads(_model(name), num_images=1)
    many = _step_reads(_model(name, "model.head.num_decoder_layers=4"), num_images=3)
    assert len(many) == len(few) and _by_file(many) == _by_file(few), (few, many)


def test_inference_forward_reads_nothing():
    model = _model("dab_detr").eval()
    batch = _batch(2)
    images = model.preprocess_image(batch)
    with torch.no_grad(), count_host_reads([*model.parameters(), *model.buffers()]) as reads:
        model.forward_raw(images)
    assert reads == []


def test_the_counter_sees_each_kind_of_read():
    x = torch.rand(8, 4)
    h = torch.rand(8)
    with count_host_reads([x]) as reads:
        h.sum().item()  # a host tensor: not a read
        h.to(torch.float64).sum().item()  # a dtype change is no move to the device: not a read either
        y = x * 2
        bool(y.sum() > 0)
        y[y > 1]
        y.cpu()
        z = h.to(x.device)  # moved to the device
        z.tolist()
        torch.tensor([2, 1]).repeat_interleave(torch.tensor([1, 2]))  # host
        torch.ones(2, dtype=torch.long).repeat_interleave(z[:2].long())
    assert [what for what, _ in reads] == [
        "_local_scalar_dense.default", "boolean mask in index.Tensor", ".cpu()", ".tolist()",
        "repeat_interleave.Tensor",
    ]
    assert all(where.startswith("test_host_reads.py:") for _, where in reads)


def test_torchvisions_giou_loss_reads_the_device_and_ours_does_not():
    boxes1 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 2.0, 2.0]], requires_grad=True)
    boxes2 = torch.tensor([[0.5, 0.5, 1.5, 1.5], [3.0, 3.0, 4.0, 4.0]])
    with count_host_reads([boxes1, boxes2]) as theirs:
        torchvision_giou_loss(boxes1, boxes2).sum().backward()
    with count_host_reads([boxes1, boxes2]) as ours:
        generalized_box_iou_loss(boxes1, boxes2).sum().backward()
    assert len(theirs) >= 5 and ours == []
