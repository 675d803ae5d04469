"""Our training step in bf16 autocast vs fp32 on the CPU, for the synthetic model and R50, in one run.

    python benchmarks/amp_speed.py [--threads 2] [--sizes synthetic r50] [--cpu-time] [--quick] [--json out.jsonl]

Each size builds one model and one optimizer per precision from the same weights (what `train.amp.enabled=True`
selects on a CPU: `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward and the loss; the matcher's cost
stays fp32) and times the two steps alternately (ABBA, medians after warm-up):
- synthetic: `configs/dab_detr_synthetic.py` (batch 16 of 128x128, its AdamW, clip 1.0, from detectron2 inputs);
- r50: `configs/models/dab_detr_r50.py` (2x3x512x512, forward_raw + criterion, fused AdamW lr 1e-4).
Rows: `{"metric": "<size>_train_step_ms", "ours": bf16 ms, "hf": fp32 ms, "ratio": bf16 / fp32}` (the `hf` column
holds the fp32 reference here, so the report's ratio is bf16 / fp32).
"""
import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import measure  # noqa: E402
from benchmarks.models import (  # noqa: E402
    adamw, as_batched_inputs, make_images, make_targets, ours_full_train_step, ours_synthetic, ours_train_step,
)

FULL = {"synthetic": (16, (128, 128)), "r50": (2, (512, 512)), "warmup": 2, "runs": {"synthetic": 11, "r50": 3}}
QUICK = {"synthetic": (2, (64, 64)), "r50": (1, (64, 64)), "warmup": 1, "runs": {"synthetic": 2, "r50": 2}}


def synthetic_steps(plan):
    from detectron2.config import instantiate

    batch, size = plan["synthetic"]
    fp32, cfg = ours_synthetic()
    data = as_batched_inputs(make_images(batch, size), make_targets(batch, num_classes=5,
                                                                    sizes=[1 + i % 6 for i in range(batch)]))
    steps = {}
    for name, model in (("bf16", copy.deepcopy(fp32)), ("fp32", fp32)):
        model.train()
        cfg.optimizer.params.model = model
        steps[name] = ours_full_train_step(model, data, amp=name == "bf16", optimizer=instantiate(cfg.optimizer),
                                           clip_max_norm=cfg.train.clip_grad.max_norm)
    return steps, f"{batch}x3x{size[0]}x{size[1]}"


def r50_steps(plan):
    from detectron2.config import LazyConfig, instantiate

    batch, size = plan["r50"]
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "models", "dab_detr_r50.py"))
    torch.manual_seed(0)
    fp32 = instantiate(cfg.model)
    images, targets = make_images(batch, size), make_targets(batch)
    steps = {}
    for name, model in (("bf16", copy.deepcopy(fp32)), ("fp32", fp32)):
        model.train()
        steps[name] = ours_train_step(model, images, targets, amp=name == "bf16", optimizer=adamw(model))
    return steps, f"{batch}x3x{size[0]}x{size[1]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--sizes", nargs="+", default=["synthetic", "r50"], choices=["synthetic", "r50"])
    parser.add_argument("--cpu-time", action="store_true",
                        help="process CPU time instead of wall time (shared machine)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs (for the test suite)")
    parser.add_argument("--json", help="write one JSON object per metric to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    report = measure.Report(args.quick)
    clock = time.process_time if args.cpu_time else time.perf_counter
    with measure.CpuMonitor() as cpu:
        for size in args.sizes:
            report.log(f"{size}: bf16 vs fp32 training step")
            steps, shape = (synthetic_steps if size == "synthetic" else r50_steps)(plan)
            losses = {name: float(step()) for name, step in steps.items()}
            if not all(torch.isfinite(torch.tensor(list(losses.values())))):
                raise RuntimeError(f"{size}: non-finite first loss {losses}")
            ms = measure.median_ms(measure.alternate(steps, plan["warmup"], plan["runs"][size], clock=clock))
            report.add(f"{size}_train_step_ms", ms["bf16"], ms["fp32"], shape=shape, runs=plan["runs"][size],
                       columns="ours = bf16, HF = fp32", clock="process CPU time" if args.cpu_time else "wall",
                       first_loss=losses)
    title = (f"Our training step, bf16 autocast vs fp32, CPU, {args.threads} threads"
             f"{', process CPU time' if args.cpu_time else ''}{' (QUICK)' if args.quick else ''}")
    measure.print_table(title, report.rows, cpu, columns=("bf16", "fp32"))
    measure.write_jsonl(args.json, report.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
