"""tools/train_net.py end to end: the same code path as `make train`, on a tiny model and a tiny dataset."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CONFIG = os.path.join(REPO, "configs", "dab_detr_synthetic.py")


def run_train_net(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"train_net failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def copypaste_metrics(log):
    """The last `copypaste:` AP line detectron2 prints after an evaluation -> dict."""
    names = re.findall(r"copypaste: (AP,AP50.*)", log)
    values = re.findall(r"copypaste: ([0-9nan.,-]+)\s*$", log, flags=re.M)
    assert names and values, "no COCO AP table in the output"
    return dict(zip(names[-1].split(","), (float(v) for v in values[-1].split(","))))


@pytest.fixture(scope="module")
def trained(tiny_coco_args, tiny_model_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_out")
    log = run_train_net(
        [
            "--config-file", CONFIG,
            *tiny_coco_args,
            "dataloader.train.total_batch_size=4",
            "train.max_iter=40",
            "train.log_period=1",
            "train.eval_period=1000",
            f"train.output_dir={out}",
            *tiny_model_overrides,
        ],
        cwd=str(out),
    )
    return out, log


def test_train_net_trains_lowers_the_loss_and_evaluates(trained):
    out, log = trained
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert (out / "model_final.pth").is_file()
    metrics = copypaste_metrics(log)
    assert set(metrics) >= {"AP", "AP50", "AP75"}


def test_evaluations_carry_the_wall_time_and_plot_against_it(trained, tmp_path):
    out, _ = trained
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    evals = [r for r in rows if "bbox/AP" in r]
    assert evals and all(0 < r["wall/minutes"] < 10 for r in evals)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import plot_metrics

    png = tmp_path / "two_runs.png"
    metrics = str(out / "metrics.json")
    assert plot_metrics.main([metrics, metrics, "--label", "a", "--label", "b", "--x", "minutes",
                              "--output", str(png)]) == 0
    assert png.stat().st_size > 0
    # a metrics file without wall times (another trainer) is a one-line error naming it
    bare = tmp_path / "metrics.json"
    bare.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "wall/minutes"}) for r in rows))
    assert plot_metrics.main([str(bare), "--x", "minutes", "--output", str(png)]) == 1
    assert plot_metrics.main([str(bare), "--output", str(png)]) == 0


def test_class_count_comes_from_the_registered_dataset(trained):
    out, log = trained
    # the synthetic config says 5; the tiny dataset has 3 categories
    config = open(out / "config.yaml").read()
    assert re.search(r"^  num_classes: 3$", config, flags=re.M)


def test_eval_only_reproduces_the_final_ap(trained, tiny_coco, tiny_model_overrides):
    out, train_log = trained
    (val_json, val_root) = tiny_coco["val"]
    log = run_train_net(
        [
            "--config-file", CONFIG, "--eval-only",
            "--register-coco", "tiny_val", val_json, val_root,
            "dataloader.train.dataset.names=tiny_val",
            "dataloader.test.dataset.names=tiny_val",
            "dataloader.test.num_workers=0",
            f"train.init_checkpoint={out / 'model_final.pth'}",
            f"train.output_dir={out / 'eval'}",
            *tiny_model_overrides,
        ],
        cwd=str(out),
    )
    assert copypaste_metrics(log) == pytest.approx(copypaste_metrics(train_log), nan_ok=True)
