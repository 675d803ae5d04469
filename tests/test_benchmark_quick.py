"""`benchmarks/compare_hf.py` end to end at a small size: it reports every metric, refuses to compare speed when the
two models disagree, and the timing runs really used the same weights (same outputs, same first loss)."""
import importlib.util
import json
import math
import mmap
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("fvcore")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compare_hf.py")
REQUIRED = {"infer_640_ms", "train_step_512_ms", "peak_mem_mb", "train_peak_mem_mb", "max_abs_diff", "gemm_efficiency",
            "synthetic_train_step_ms", "train_page_faults_mib", "train_host_reads", "infer_b2_64x96_ms",
            "train_step_b2_64x96_ms"}


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    with open(path) as f:
        return {row["metric"]: row for row in map(json.loads, f)}


@pytest.mark.slow
def test_quick_run_reports_agreement_and_every_metric(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours/HF" in proc.stdout  # the readable table
    rows = _rows(out)
    assert REQUIRED <= set(rows)
    for row in rows.values():
        assert {"metric", "ours", "hf", "ratio"} <= set(row) and row["quick"] is True
    assert rows["max_abs_diff"]["ours"] <= 1e-4
    # the training comparison started from the same weights and targets: the same loss
    first = rows["train_first_loss"]
    assert first["ours"] == pytest.approx(first["hf"], rel=1e-4)
    for name in ("infer_640_ms", "train_step_512_ms", "peak_mem_mb", "train_peak_mem_mb", "synthetic_train_step_ms"):
        row = rows[name]
        assert row["ours"] > 0 and row["hf"] > 0 and row["ratio"] == pytest.approx(row["ours"] / row["hf"])
    assert rows["gemm_efficiency"]["ours"] > 0
    assert rows["train_page_faults_mib"]["ours"] >= 0 and rows["train_page_faults_mib"]["hf"] >= 0
    assert rows["train_step_512_ms"]["trainable_params"] > 0
    # host reads (syncs on a GPU) of one step: ours its targets' check and the matcher's one copy; HF's far more
    reads = rows["train_host_reads"]
    assert reads["ours"] == 2 and reads["where"]["ours"] == {"targets.py": 1, "matcher.py": 1}
    assert reads["hf"] > 2 * reads["ours"]
    params = rows["synthetic_train_step_ms"]["params"]  # the make-train model against HF's built the same
    assert params["ours"] == params["hf"] > 0
    # throughput rows (the GPU figures' format): FPS and images/s are the inverse of the timings
    assert rows["infer_fps_96x96"]["ours"] == pytest.approx(1e3 / rows["infer_640_ms"]["ours"])
    # the batched rows (batches of 2 and 8 at 800x1333 on a GPU; one batch of 2 here): images/s of the batch
    for timing, throughput in (("infer_b2_64x96_ms", "infer_images_per_s_b2_64x96"),
                               ("train_step_b2_64x96_ms", "train_images_per_s_b2_64x96")):
        assert rows[timing]["shape"] == "2x3x64x96" and rows[timing]["ours"] > 0 and rows[timing]["hf"] > 0
        assert rows[throughput]["hf"] == pytest.approx(2e3 / rows[timing]["hf"])
    assert rows["train_images_per_s_64x64"]["hf"] == pytest.approx(2e3 / rows["train_step_512_ms"]["hf"])


@pytest.mark.slow
def test_amp_training_steps_of_both_models_start_from_the_same_loss():
    """`--amp` times autocast steps (bf16 on the CPU): both models still see the same weights and targets."""
    from benchmarks import models

    torch = pytest.importorskip("torch")
    hf = models.hf_r50()
    ours = models.ours_r50(hf.state_dict(), hf_format=True)
    images, targets = models.make_images(2, (64, 64)), models.make_targets(2)
    losses = [float(step()) for step in (models.ours_train_step(ours.train(), images, targets, amp=True),
                                         models.hf_train_step(hf.train(), images, targets, amp=True))]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)  # bf16 rounding differs between the two codes


@pytest.mark.slow
def test_no_speed_is_reported_when_outputs_disagree(tmp_path, monkeypatch):
    script = _load_script()
    build_ours = script.ours_r50

    def build_wrong_ours(state_dict, hf_format):
        model = build_ours(state_dict, hf_format)
        model.head.class_embed.bias.data += 1e-3  # a small but real difference
        return model

    monkeypatch.setattr(script, "ours_r50", build_wrong_ours)
    out = tmp_path / "bench.jsonl"
    assert script.main(["--quick", "--threads", "1", "--json", str(out), "--sizes", "r50"]) == 1
    rows = _rows(out)
    assert set(rows) == {"max_abs_diff"}
    assert rows["max_abs_diff"]["ours"] == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.slow
def test_amp_speed_quick_run_times_bf16_against_fp32(tmp_path):
    """`benchmarks/amp_speed.py --quick`: one row per size, bf16 and fp32 steps timed, both first losses finite."""
    out = tmp_path / "amp.jsonl"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "amp_speed.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16/fp32" in proc.stdout
    rows = _rows(out)
    assert set(rows) == {"synthetic_train_step_ms", "r50_train_step_ms"}
    for row in rows.values():
        assert row["ours"] > 0 and row["hf"] > 0 and row["ratio"] == pytest.approx(row["ours"] / row["hf"])
        assert all(math.isfinite(v) for v in row["first_loss"].values())


def _write_fresh_pages(nbytes: int) -> None:
    """Write one byte into every page of a new anonymous mapping (fresh from the kernel whatever the C library's
    heap holds; small pages, so one fault a page)."""
    memory = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        memory[offset] = 1
    memory.close()


def test_page_faults_count_the_fresh_memory_a_call_writes():
    from benchmarks import measure

    fns, faults = measure.count_page_faults({"fresh": lambda: _write_fresh_pages(64 << 20), "none": lambda: None})
    fns["fresh"](), fns["none"](), fns["fresh"]()
    assert [len(faults["fresh"]), len(faults["none"])] == [2, 1]
    assert all(63 <= mib <= 66 for mib in faults["fresh"]), faults
    assert faults["none"][0] < 1
