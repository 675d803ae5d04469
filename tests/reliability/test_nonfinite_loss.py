"""A NaN loss stops training at that iteration, naming the losses; the last good checkpoint stays loadable."""
import math
import os

import pytest
import torch

from reliability_helpers import (
    CONFIG,
    assert_one_line_error,
    dataset_args,
    default_images,
    load_checkpoint,
    metrics_rows,
    run_train_net,
    write_coco,
)

HERE = os.path.dirname(os.path.abspath(__file__))

# The synthetic recipe with its criterion wrapped by the test-only NaNLossAt: the model's weights and
# checkpoint keys are unchanged, so the checkpoints load into the plain config.
NAN_CONFIG = f'''
import sys
sys.path.insert(0, {HERE!r})
from detectron2.config import LazyCall as L, LazyConfig
from nan_injection import NaNLossAt

_base = LazyConfig.load({CONFIG!r})
model, dataloader, optimizer, train, lr_multiplier = (
    _base.model, _base.dataloader, _base.optimizer, _base.train, _base.lr_multiplier)
_criterion = model.criterion
_criterion.num_classes = "${{...num_classes}}"  # one level deeper than in the base config
model.criterion = L(NaNLossAt)(criterion=_criterion, iteration=5)
'''


@pytest.mark.slow
def test_nan_loss_stops_at_that_iteration_and_keeps_the_last_checkpoint(tmp_path):
    config = tmp_path / "nan_config.py"
    config.write_text(NAN_CONFIG)
    data = write_coco(str(tmp_path / "data"), default_images(6))
    out = tmp_path / "out"
    proc = run_train_net(
        ["--num-gpus", "0", *dataset_args(data)],
        ["train.max_iter=10", "train.checkpointer.period=2", f"train.output_dir={out}"],
        config=str(config),
    )
    line = assert_one_line_error(proc, "Loss became infinite or NaN at iteration 5", "loss_bbox=nan")
    assert "loss_giou=" in line and "loss_class=" in line  # every term, with its value

    # iterations 0-4 were logged, finite; nothing of iteration 5 was
    rows = [r for r in metrics_rows(str(out)) if "total_loss" in r]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(r["total_loss"]) for r in rows)

    # the last checkpoint is the one written after iteration 3, complete and finite, and last_checkpoint names it
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (out / "model_final.pth").exists()
    ckpt = load_checkpoint(str(out / "model_0000003.pth"))
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

    # ... and it loads into the plain config (train_net --eval-only)
    eval_proc = run_train_net(
        ["--num-gpus", "0", "--eval-only", *dataset_args(data)],
        [f"train.init_checkpoint={out / 'model_0000003.pth'}", f"train.output_dir={tmp_path / 'eval'}"],
    )
    assert eval_proc.returncode == 0, eval_proc.stdout[-3000:] + eval_proc.stderr[-3000:]
    assert "copypaste: AP,AP50" in eval_proc.stdout
