"""The resumable training data stream (dab_detr.engine.train_loader) and the trainer's per-iteration seeding."""
import itertools
import random

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import hooks
from torch import nn

from dab_detr.engine import train_loader as tl
from dab_detr.engine.checkpointer import DetrCheckpointer
from dab_detr.errors import DatasetError, NonFiniteLossError, one_line
from dab_detr.engine.train_loader import ResumableTrainLoader, TrainBatchSchedule, build_resumable_train_loader
from dab_detr.engine.trainer import DetrTrainer


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _random_mapper(d):
    """Uses all three global RNGs, as augmentations do."""
    return {"i": d["i"], "np": float(np.random.rand()), "py": random.random(), "torch": float(torch.rand(()))}


def _dicts(n, portrait=()):
    return [{"i": i, "width": 30 if i in portrait else 40, "height": 40 if i in portrait else 30} for i in range(n)]


@pytest.mark.parametrize("group_ids", [None, [0, 1, 1, 0, 1, 0, 0]])
def test_schedule_started_at_k_is_the_tail_of_the_full_schedule(group_ids):
    schedule = TrainBatchSchedule(7, 4, seed=3, group_ids=group_ids)
    full = _take(schedule.batches(0), 12)
    assert _take(schedule.batches(5), 7) == full[5:]
    if group_ids is not None:  # each batch from one group
        assert all(len({group_ids[i] for _, i in batch}) == 1 for batch in full)


def test_schedule_follows_detectron2_training_sampler_stream():
    schedule = TrainBatchSchedule(5, 3, seed=11)
    ours = [i for batch in _take(schedule.batches(0), 4) for _, i in batch]
    theirs = _take(iter(TrainingSampler(5, shuffle=True, seed=11)), 12)
    assert ours == theirs


def test_loader_resumed_at_k_gives_the_same_batches_and_augmentations():
    loader = ResumableTrainLoader(_dicts(9), _random_mapper, 3, seed=5, aspect_ratio_grouping=False)
    full = _take(iter(loader), 6)
    loader.set_start_iter(4)
    assert _take(iter(loader), 2) == full[4:]


def test_loader_output_does_not_depend_on_the_number_of_workers():
    def batches(num_workers):
        loader = ResumableTrainLoader(_dicts(9, portrait=(1, 4)), _random_mapper, 2, seed=5, num_workers=num_workers)
        loader.set_start_iter(1)
        return _take(iter(loader), 5)

    assert batches(0) == batches(2)


def test_processes_take_consecutive_slices_of_the_same_global_batch(monkeypatch):
    single = _take(iter(ResumableTrainLoader(_dicts(9), _random_mapper, 4, seed=2)), 3)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(tl.comm, "get_world_size", lambda: 2)
        monkeypatch.setattr(tl.comm, "get_rank", lambda rank=rank: rank)
        per_rank.append(_take(iter(ResumableTrainLoader(_dicts(9), _random_mapper, 4, seed=2)), 3))
    assert [a + b for a, b in zip(*per_rank)] == single


def test_loading_in_the_training_process_leaves_its_rngs_alone():
    loader = ResumableTrainLoader(_dicts(4), _random_mapper, 2, seed=0)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    _take(iter(loader), 3)
    after = (float(torch.rand(())), float(np.random.rand()), random.random())
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    assert after == (float(torch.rand(())), float(np.random.rand()), random.random())


def test_a_skipped_image_is_replaced_by_the_same_image_every_time():
    def mapper(d):
        return None if d["i"] == 2 else _random_mapper(d)

    def first_batches():
        return _take(iter(ResumableTrainLoader(_dicts(5), mapper, 5, seed=1, aspect_ratio_grouping=False)), 2)

    batches = first_batches()
    assert all(item["i"] != 2 and len(batch) == 5 for batch in batches for item in batch)
    assert batches == first_batches()


def test_a_loader_that_only_skips_stops_with_an_error():
    loader = ResumableTrainLoader(_dicts(3), lambda d: None, 1, seed=1)
    with pytest.raises(DatasetError, match="skipped 21 images in a row"):
        next(iter(loader))


def test_an_empty_training_set_is_a_dataset_error():
    with pytest.raises(DatasetError, match="training set is empty"):
        build_resumable_train_loader([], mapper=None, total_batch_size=2, seed=0)


def test_batch_size_not_divisible_by_processes_is_a_config_error(monkeypatch):
    monkeypatch.setattr(tl.comm, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="total_batch_size=3 is not divisible by the number of processes"):
        ResumableTrainLoader(_dicts(4), None, 3, seed=0)


# --------------------------------------------------------------------------------------------------------------
# DetrTrainer + DetrCheckpointer + ResumableTrainLoader: a resumed run equals the uninterrupted one


class _DropoutModel(nn.Module):
    """Random in training (dropout) and fed randomly augmented data: any RNG not restored shows in the weights."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.dropout = nn.Dropout(0.5)

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        return {"loss": self.dropout(self.linear(x)).pow(2).mean()}


def _augment(d):
    return {"x": d["x"] + torch.randn(4) * float(np.random.rand())}


def _trainer(seed=0):
    torch.manual_seed(0)
    model = _DropoutModel()
    data = [{"x": torch.full((4,), float(i)), "width": 2, "height": 1} for i in range(5)]
    loader = ResumableTrainLoader(data, _augment, 2, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return DetrTrainer(model, loader, optimizer, clip_max_norm=1.0, seed=seed), model


def test_trainer_resumed_from_a_checkpoint_ends_with_bitwise_the_same_weights(tmp_path):
    trainer, model = _trainer()
    checkpointer = DetrCheckpointer(model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, period=3)])
    trainer.train(0, 6)  # saves model_0000002.pth after iteration 2, as train_net does
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(999)  # a new process would not have the old one's RNG states
    np.random.seed(999)
    resumed, model2 = _trainer()
    DetrCheckpointer(model2, trainer=resumed).load(str(tmp_path / "model_0000002.pth"))
    assert resumed.iter == 2
    resumed.train(resumed.iter + 1, 6)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, straight[k]), k

    other_seed, model3 = _trainer(seed=1)  # the comparison can fail
    other_seed.train(0, 6)
    assert not torch.equal(model3.linear.weight, straight["linear.weight"])


def test_trainer_warns_when_its_loader_cannot_resume(dab_caplog):
    model = _DropoutModel()
    loader = [[{"x": torch.zeros(4)}]] * 10
    trainer = DetrTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    trainer.train(3, 4)
    assert "cannot skip to iteration 3" in dab_caplog.text


def _failing_mapper(d):
    raise DatasetError(f"image {d['i']}: bad")


def test_an_error_in_a_loading_worker_keeps_its_type_and_message_for_the_one_line_report():
    loader = ResumableTrainLoader(_dicts(3), _failing_mapper, 1, seed=0, num_workers=1)
    with pytest.raises(DatasetError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)  # torch's wrapping
    assert one_line(e.value) == f"image {_take(TrainBatchSchedule(3, 1, seed=0).batches(0), 1)[0][0][1]}: bad"


class _InfiniteGradient(nn.Module):
    """A finite loss (0) whose gradient is infinite: d sqrt(w) / dw at w = 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        return {"loss_sqrt": torch.sqrt(self.w)}


def test_a_non_finite_gradient_norm_stops_training_before_the_step():
    model = _InfiniteGradient()
    trainer = DetrTrainer(model, [[{}]] * 3, torch.optim.SGD(model.parameters(), lr=0.1), clip_max_norm=1.0)
    with pytest.raises(NonFiniteLossError, match="Non-finite gradient norm .* at iteration 0"):
        trainer.train(0, 3)
    assert model.w.item() == 0.0  # not updated
