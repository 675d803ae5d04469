"""Exact resume and determinism of tools/train_net.py on CPU.

Training N iterations straight and training N/2, stopping, then `--resume` to N end with bitwise-identical
weights and optimizer state (data order, augmentations, RNGs, LR schedule and iteration all restored); two runs
with the same seed give the same losses; the number of data-loading workers changes nothing.
"""
import os
import shutil

import pytest
import torch

from reliability_helpers import dataset_args, default_images, load_checkpoint, metrics_rows, run_train_net, write_coco

N = 8  # iterations; checkpoints after iterations 3 and 7


def _train(data, out, *extra_options, overrides=()):
    proc = run_train_net(
        ["--num-gpus", "0", *extra_options, *dataset_args(data)],
        [f"train.max_iter={N}", f"train.checkpointer.period={N // 2}", f"train.output_dir={out}", *overrides],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    specs = default_images(10)
    for spec in specs[::3]:
        spec["size"] = (48, 64)  # some portrait images: aspect-ratio grouping has two groups
    data = write_coco(str(root / "data"), specs)
    # the synthetic recipe: random flips, warm-up + cosine LR, AdamW, gradient clipping, BN in the backbone
    _train(data, root / "straight")
    _train(data, root / "again", overrides=["dataloader.train.num_workers=2"])
    _train(data, root / "seed7", overrides=["train.seed=7", "train.max_iter=3"])
    # "stop" after N/2 iterations: a fresh output folder holding only the checkpoint written at N/2
    os.makedirs(root / "resumed")
    shutil.copy(root / "straight" / f"model_{N // 2 - 1:07d}.pth", root / "resumed")
    (root / "resumed" / "last_checkpoint").write_text(f"model_{N // 2 - 1:07d}.pth")
    resumed = _train(data, root / "resumed", "--resume", overrides=["dataloader.train.num_workers=1"])
    return root, resumed.stdout


def _losses(out):
    return [(r["iteration"], r["total_loss"]) for r in metrics_rows(str(out)) if "total_loss" in r]


def _assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        elif isinstance(a[k], dict):
            _assert_same_tensors(a[k], b[k], f"{what}.{k}")
        else:
            assert a[k] == b[k], f"{what}: {k}: {a[k]} != {b[k]}"


@pytest.mark.slow
def test_resumed_run_ends_bitwise_equal_to_the_uninterrupted_run(runs):
    root, resumed_log = runs
    assert f"Starting training from iteration {N // 2}" in resumed_log
    assert f"Training data resumes at global batch {N // 2}" in resumed_log
    straight = load_checkpoint(str(root / "straight" / "model_final.pth"))
    resumed = load_checkpoint(str(root / "resumed" / "model_final.pth"))
    _assert_same_tensors(straight["model"], resumed["model"], "model")  # bitwise, BN statistics included
    _assert_same_tensors(straight["trainer"]["optimizer"], resumed["trainer"]["optimizer"], "optimizer")
    assert straight["trainer"]["iteration"] == resumed["trainer"]["iteration"]
    assert straight["trainer"]["hooks"] == resumed["trainer"]["hooks"]  # LR scheduler state


@pytest.mark.slow
def test_same_seed_gives_the_same_losses_and_weights_whatever_the_workers(runs):
    root, _ = runs
    losses = _losses(root / "straight")
    assert [i for i, _ in losses] == list(range(N))
    assert _losses(root / "again") == losses  # the second run used 2 data-loading workers
    _assert_same_tensors(
        load_checkpoint(str(root / "straight" / "model_final.pth"))["model"],
        load_checkpoint(str(root / "again" / "model_final.pth"))["model"],
        "model",
    )


@pytest.mark.slow
def test_another_seed_gives_other_losses(runs):
    root, _ = runs
    assert [v for _, v in _losses(root / "seed7")] != [v for _, v in _losses(root / "straight")][:3]


@pytest.fixture(scope="module")
def dn_runs(tmp_path_factory):
    """Straight and resumed runs with denoising training on: its noise comes from torch's global generator, which
    the trainer re-seeds before every step."""
    root = tmp_path_factory.mktemp("resume_dn")
    data = write_coco(str(root / "data"), default_images(10))
    dn = ["model.head.dn=True", "model.head.denoising_groups=3"]
    _train(data, root / "straight", overrides=dn)
    os.makedirs(root / "resumed")
    shutil.copy(root / "straight" / f"model_{N // 2 - 1:07d}.pth", root / "resumed")
    (root / "resumed" / "last_checkpoint").write_text(f"model_{N // 2 - 1:07d}.pth")
    _train(data, root / "resumed", "--resume", overrides=dn)
    return root


@pytest.mark.slow
def test_resume_with_denoising_training_is_bitwise_exact(dn_runs):
    rows = [r for r in metrics_rows(str(dn_runs / "straight")) if "total_loss" in r]
    assert all("loss_class_dn" in r and "loss_giou_dn_0" in r for r in rows)
    straight = load_checkpoint(str(dn_runs / "straight" / "model_final.pth"))
    resumed = load_checkpoint(str(dn_runs / "resumed" / "model_final.pth"))
    assert "head.denoising.label_embed.weight" in straight["model"]
    _assert_same_tensors(straight["model"], resumed["model"], "model")
    _assert_same_tensors(straight["trainer"]["optimizer"], resumed["trainer"]["optimizer"], "optimizer")
