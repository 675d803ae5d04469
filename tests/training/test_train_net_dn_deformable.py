"""tools/train_net.py trains DAB-Deformable-DETR with denoising (`model.head.dn=True`) for a few iterations."""
import json
import os

import pytest

from test_train_net import REPO, run_train_net

CONFIG = os.path.join(REPO, "configs", "dab_deformable_detr_synthetic.py")


@pytest.mark.slow
def test_train_net_runs_dn_deformable_with_finite_dn_losses(tiny_coco_args, tiny_model_overrides, tmp_path):
    run_train_net(
        [
            "--config-file", CONFIG,
            *tiny_coco_args,
            "dataloader.train.total_batch_size=2",
            "train.max_iter=3",
            "train.log_period=1",
            "train.eval_period=1000",
            f"train.output_dir={tmp_path}",
            "model.head.dn=True",
            *tiny_model_overrides,
            "model.backbone.stages.widths=[8,16,32,64]",  # this config's res5 has stride 2: it must widen
        ],
        cwd=str(tmp_path),
    )
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    dn_rows = [r for r in rows if "loss_bbox_dn" in r]
    assert len(dn_rows) == 3, "every iteration logs the denoising losses"
    for r in dn_rows:
        for key in ("loss_class_dn", "loss_bbox_dn", "loss_giou_dn", "loss_giou_dn_0", "total_loss"):
            assert r[key] == r[key] and abs(r[key]) < float("inf"), key  # finite
