"""Distributed training on CPU: the same tools/train_net.py with `--num-gpus 2` starts 2 gloo processes.

Two processes with a total batch of 2 train the same model as one process with a batch of 2 (the global batches are
the same, DDP averages gradients, and `num_boxes` is all-reduced, so the loss normaliser is the same: without
the all-reduce the weights differ 10^5 times more); the parameters are bitwise identical on both processes;
evaluation gathers the predictions of both.
"""
import copy
import json

import pytest
import torch

from dab_detr.engine import hooks
from reliability_helpers import dataset_args, default_images, load_checkpoint, run_train_net, write_coco

COMPARABLE = [
    # FrozenBN: plain BN normalises each process's half batch separately, which no single process reproduces.
    "model.backbone.stem.norm=FrozenBN",
    "model.backbone.stages.norm=FrozenBN",
    # Adam's first steps move every weight by about lr whatever the gradient's size, so rounding noise in a
    # near-zero gradient becomes a full step; a large eps makes the update proportional to the gradient.
    "optimizer.eps=1.0",
    "optimizer.lr=0.05",
    "lr_multiplier.warmup_length=0.0",
]


def _copypaste(log):
    lines = [line for line in log.splitlines() if "copypaste: " in line]
    names, values = lines[-2].split("copypaste: ")[1], lines[-1].split("copypaste: ")[1]
    return dict(zip(names.split(","), (float(v) for v in values.split(","))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    train = write_coco(str(root / "train"), default_images(8))  # 1, 2 or 3 boxes per image
    test = write_coco(str(root / "test"), default_images(5, seed=1))
    overrides = [*COMPARABLE, "train.max_iter=6", "train.checkpointer.period=3", "train.eval_period=0"]
    logs = {}
    for name, options in [("two", ["--num-gpus", "2", "--dist-url", "auto"]), ("one", ["--num-gpus", "1"])]:
        proc = run_train_net([*options, *dataset_args(train, test)], [*overrides, f"train.output_dir={root / name}"])
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        logs[name] = proc.stdout
    return root, logs


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_total_batch(runs):
    root, logs = runs
    assert "World size: 2" in logs["two"] and "World size: 1" in logs["one"]
    two = load_checkpoint(str(root / "two" / "model_final.pth"))["model"]
    one = load_checkpoint(str(root / "one" / "model_final.pth"))["model"]
    assert two.keys() == one.keys()
    earlier = load_checkpoint(str(root / "one" / "model_0000002.pth"))["model"]
    gap = max((two[k] - one[k]).abs().max().item() for k in one if one[k].numel())
    progress = max((one[k] - earlier[k]).abs().max().item() for k in one if one[k].numel())
    # not bitwise (gradients are summed in another order), but far closer than 3 iterations of training move them
    # measured: gap 6e-8, progress 6e-3; with a per-process num_boxes (not all-reduced) the gap is 8e-3
    assert gap < 1e-6 and progress > 1e-3, (gap, progress)
    assert "Parameters identical on all 2 processes after 6 iterations" in logs["two"]


@pytest.mark.slow
def test_evaluation_gathers_the_predictions_of_both_processes(runs):
    root, logs = runs
    results = json.load(open(root / "two" / "coco_instances_results.json"))
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert per_image == {i: 10 for i in range(1, 6)}  # every test image, num_select predictions each
    assert _copypaste(logs["two"]) == pytest.approx(_copypaste(logs["one"]), abs=1e-3, nan_ok=True)


# --------------------------------------------------------------------------------------------------------------
# The parameter check itself can fail (its collective replaced by a fake second process)


def test_parameter_drift_between_processes_is_an_error_naming_the_tensor(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    other = copy.deepcopy(model)
    monkeypatch.setattr(hooks.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(hooks.comm, "all_gather", lambda mine: [mine, hooks.parameter_digests(other)])
    assert hooks.check_parameters_in_sync(model) == 4
    with torch.no_grad():
        other[1].bias[0] += 1e-7  # one ulp-sized difference is enough
    with pytest.raises(RuntimeError, match="differ between the 2 training processes: 1.bias"):
        hooks.check_parameters_in_sync(model)


def test_parameter_digests_accept_channels_last_weights():
    """DABDETR keeps its backbone NHWC: 1x1 kernels then count as contiguous but keep a last stride != 1."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(8, 8, 3))
    before = hooks.parameter_digests(model)
    model.to(memory_format=torch.channels_last)
    assert model[0].weight.stride(-1) != 1
    assert hooks.parameter_digests(model) == before  # same values, same digest, whatever the layout


# --------------------------------------------------------------------------------------------------------------
# A non-finite loss on one process stops both (two real gloo processes, a one-weight model)


class _NaNOnRank(torch.nn.Module):
    """Loss w^2 on every rank, NaN on rank `bad_rank` at iteration 1."""

    def __init__(self, bad_rank: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.bad_rank = bad_rank
        self.calls = 0

    def forward(self, batch):
        import torch.distributed as dist

        loss = self.w * self.w
        if dist.get_rank() == self.bad_rank and self.calls == 1:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_w": loss}


def _train_until_nan(rank: int, init_file: str, results):
    import torch.distributed as dist

    from dab_detr.engine.trainer import DetrTrainer
    from dab_detr.errors import NonFiniteLossError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = _NaNOnRank(bad_rank=1)
    trainer = DetrTrainer(model, [[{}]] * 5, torch.optim.SGD(model.parameters(), lr=0.1), clip_max_norm=1.0)
    try:
        trainer.train(0, 5)
        results[rank] = ("finished", model.w.item())
    except NonFiniteLossError as e:
        results[rank] = (str(e), model.w.item())
    finally:
        dist.destroy_process_group()


def test_a_nan_loss_on_one_process_stops_every_process_before_the_step(tmp_path):
    context = torch.multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    procs = [context.Process(target=_train_until_nan, args=(r, str(tmp_path / "init"), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        p.kill() if p.is_alive() else None
    assert not any(alive), "a process hung"
    # iteration 0 stepped both (w = 1 - 0.1 * 1 after clipping the gradient 2 to norm 1), iteration 1 stopped both
    for rank in (0, 1):
        message, w = results[rank]
        assert "Loss became infinite or NaN at iteration 1 (on at least one worker)" in message, dict(results)
        assert w == pytest.approx(0.9, abs=1e-6), dict(results)
    assert results[1][0].endswith("loss_w=nan") and results[0][0].endswith("loss_w=0.81")
