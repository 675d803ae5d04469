"""Our DAB-DETR vs HuggingFace `DabDetrForObjectDetection` (R50 and the synthetic size): speed, memory, FLOPs.

    python benchmarks/compare_hf.py [--json results.jsonl] [--threads 2] [--quick] [--device cuda] [--amp]
                                    [--sizes r50 synthetic] [--cpu-time]

The models and steps are `benchmarks.models` (shared with the tests), the timing and memory helpers
`benchmarks.measure`; this file is the command line and the list of comparisons.

One process builds both models (HF's with random weights, ours loaded from it by `dab_detr.checkpoint.hf`), checks
that their outputs agree to 1e-4 on the benchmark input (otherwise it reports no timings and exits 1), then times
them alternately (ABBA order, medians after warm-up, the same input and thread count):
- inference, 1x3x640x640 and 1x3x800x1333 (`forward_raw` vs HF `forward`: both return logits and boxes);
- one training step, 2x3x512x512 with the same targets: forward + loss + backward + fused AdamW step, the stem frozen in
  both (our `freeze_at=1`), dropout 0, auxiliary losses on, HF's class-loss weight set to ours (1);
- the host reads of device memory in one training step (`benchmarks.host_reads`: `.item()`, `.cpu()`, boolean-mask
  indexing, ...; each is a host-device sync on a GPU), counted the same way on any device;
- the memory each training step touched for the first time (minor page faults, median MiB): glibc serves a
  tensor of 32 MiB or more with a fresh mapping unless its heap has that much free, so a step can pay ~8 ms per
  32 MiB it writes; how much a step faults in depends on the heap the two models leave each other, and it moves
  HF's step time most;
- peak memory: each model in a fresh subprocess that loads the same weights, returns freed heap to the OS
  (`malloc_trim`), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs two inferences (or two
  training steps) and reports the peak RSS above the loaded-model baseline;
- FLOPs (fvcore, one multiply-add = 2 FLOPs) and the achieved GFLOP/s next to a plain fp32 GEMM's GFLOP/s
  measured in the same run;
- `synthetic` size: one training step of the `configs/dab_detr_synthetic.py` model (what `make train` trains; batch
  16 of 128x128: forward + loss + backward + clip 1.0 + its AdamW, as the trainer runs it from detectron2 inputs)
  against HF's model built the same (`benchmarks.models.hf_synthetic`: the same layers, 2,097,705 parameters each)
  with fused AdamW (HF Trainer's default) at the same lr; different random weights, so no agreement check there.
The machine's load (load average, busy cores outside this process) is recorded: rerun when others were busy.

`--device cuda` runs the same comparison on a GPU (timings synchronised with the device, peak memory from the CUDA
allocator in this process, the GEMM on the GPU) and adds inference and a training step of 2 and of 8 images at
800x1333, each with its images/s and peak memory; every run also reports inference FPS and training images/s.
`--amp` times both models under autocast (fp16 with a GradScaler on CUDA, bf16 on the CPU); the output agreement
is always checked in fp32 first.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Dict, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import measure  # noqa: E402
from benchmarks.host_reads import step_host_reads  # noqa: E402
from benchmarks.models import (  # noqa: E402
    adamw, as_batched_inputs, autocast, hf_infer, hf_r50, hf_synthetic, hf_train_step, make_images, make_targets,
    ours_full_train_step, ours_infer, ours_r50, ours_synthetic, ours_train_step, trainable_count,
)

AGREEMENT_TOL = 1e-4
FULL = {"infer": [(640, 640), (800, 1333)], "train": (512, 512), "warmup": 2, "runs": 7, "train_runs": 11,
        "synthetic": (16, (128, 128)), "synthetic_runs": 15}
QUICK = {"infer": [(96, 96)], "train": (64, 64), "warmup": 1, "runs": 2, "train_runs": 2,
         "synthetic": (2, (64, 64)), "synthetic_runs": 2, "batched": [(2, (64, 96))]}
# On a GPU, also the COCO-sized batches of the figures: inference and a training step of 2 and of 8 images
# at 800x1333, with the CUDA allocator's peak for each.
GPU = {"infer": [(640, 640), (800, 1333)], "train": (512, 512), "warmup": 5, "runs": 30, "train_runs": 20,
       "synthetic": (16, (128, 128)), "synthetic_runs": 30, "batched": [(2, (800, 1333)), (8, (800, 1333))]}


# --- peak memory in a fresh process ------------------------------------------------------------------------------
def memory_worker(args) -> None:
    """Subprocess entry: load one model, print the peak RSS increase of inference, then of training, as JSON."""
    import json

    torch.set_num_threads(args.threads)
    state = torch.load(args.weights, weights_only=True)
    if args.worker == "ours":
        model = ours_r50(state, hf_format=False)
        infer, train_step = ours_infer, ours_train_step
    else:
        model = hf_r50()
        model.load_state_dict(state)
        infer, train_step = hf_infer, hf_train_step
    del state
    result = {}
    model.eval()
    with torch.no_grad(), autocast("cpu", args.amp):
        result["infer"] = measure.peak_rss_increase(infer(model, make_images(1, tuple(args.infer_size))))
    model.train()
    step = train_step(model, make_images(2, tuple(args.train_size)), make_targets(2), args.amp)
    result["train"] = measure.peak_rss_increase(step)
    print(json.dumps(result))


def measure_memory(name: str, weights: str, plan, threads: int, amp: bool) -> Dict[str, Tuple[float, float, str]]:
    """Run `memory_worker` for model `name` in a fresh Python process."""
    infer_size, train_size = plan["infer"][0], plan["train"]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--weights", weights, "--threads", str(threads),
           "--infer-size", str(infer_size[0]), str(infer_size[1]),
           "--train-size", str(train_size[0]), str(train_size[1])] + (["--amp"] if amp else [])
    return measure.run_json_subprocess(cmd, f"memory worker for {name}")


def cuda_memory(ours, hf, plan, amp: bool) -> Dict[str, Dict[str, Tuple[float, float, str]]]:
    """Peak CUDA memory of inference and of training, in this process (the allocator counts per call)."""
    mem = {}
    for name, model, infer, train_step in (("ours", ours, ours_infer, ours_train_step),
                                           ("hf", hf, hf_infer, hf_train_step)):
        model.eval()
        with torch.no_grad(), autocast("cuda", amp):
            infer_mem = measure.cuda_peak_increase(infer(model, make_images(1, plan["infer"][0], device="cuda")))
        model.train()
        step = train_step(model, make_images(2, plan["train"], device="cuda"), make_targets(2, device="cuda"), amp)
        mem[name] = {"infer": infer_mem, "train": measure.cuda_peak_increase(step)}
        model.eval()
    return mem


# --- the comparisons ---------------------------------------------------------------------------------------------
def time_inference(report, ours, hf, plan, device: str, amp: bool) -> None:
    with torch.no_grad(), autocast(device, amp):
        for i, size in enumerate(plan["infer"]):
            report.log(f"inference 1x3x{size[0]}x{size[1]}")
            images = make_images(1, size, device=device)
            times = measure.alternate({"ours": ours_infer(ours, images), "hf": hf_infer(hf, images)},
                                      plan["warmup"], plan["runs"], device)
            shape = f"1x3x{size[0]}x{size[1]}"
            name = "infer_640_ms" if i == 0 else f"infer_{size[0]}x{size[1]}_ms"
            ms = measure.median_ms(times)
            report.add(name, ms["ours"], ms["hf"], shape=shape, runs=plan["runs"])
            report.add(f"infer_fps_{size[0]}x{size[1]}", 1e3 / ms["ours"], 1e3 / ms["hf"], shape=shape)


def time_training(report, ours, hf, plan, device: str, amp: bool) -> None:
    ours.train(), hf.train()
    trainable = (trainable_count(ours), trainable_count(hf))
    if trainable[0] != trainable[1]:
        raise RuntimeError(f"trainable parameter counts differ: ours {trainable[0]}, HF {trainable[1]}")
    size = plan["train"]
    shape = f"2x3x{size[0]}x{size[1]}"
    report.log(f"training step {shape}")
    images, targets = make_images(2, size, device=device), make_targets(2, device=device)
    optimizers = {"ours": adamw(ours), "hf": adamw(hf)}
    steps = {"ours": ours_train_step(ours, images, targets, amp, optimizer=optimizers["ours"]),
             "hf": hf_train_step(hf, images, targets, amp, optimizer=optimizers["hf"])}
    first_loss = {name: float(step()) for name, step in steps.items()}  # same weights: the same loss expected
    timed, faults = measure.count_page_faults(steps)
    ms = measure.median_ms(measure.alternate(timed, plan["warmup"] - 1, plan["train_runs"], device))
    report.add("train_step_512_ms", ms["ours"], ms["hf"], shape=shape, runs=plan["train_runs"],
               trainable_params=trainable[0])
    report.add(f"train_images_per_s_{size[0]}x{size[1]}", 2e3 / ms["ours"], 2e3 / ms["hf"], shape=shape)
    report.add("train_first_loss", first_loss["ours"], first_loss["hf"])
    # each read of device memory by the host is a sync on a GPU; counted the same way on any device
    inputs = [images, *(t for target in targets for t in target.values())]
    reads = {name: step_host_reads(step, model, optimizers[name], inputs)
             for (name, step), model in zip(steps.items(), (ours, hf))}
    report.add("train_host_reads", len(reads["ours"]), len(reads["hf"]), shape=shape,
               where={name: dict(Counter(where.split(":")[0] for _, where in r)) for name, r in reads.items()})
    if device == "cpu":  # the timed calls only
        report.add("train_page_faults_mib", *(statistics.median(faults[name][-plan["train_runs"]:])
                                              for name in ("ours", "hf")), shape=shape)
    ours.eval(), hf.eval()


def _time_batch(report, kind: str, fns, plan, device: str, batch: int, size) -> None:
    """Rows of one batched comparison (`kind` "infer" or "train"): ms, images/s and, on CUDA, the peak memory."""
    shape, tag = f"{batch}x3x{size[0]}x{size[1]}", f"b{batch}_{size[0]}x{size[1]}"
    runs = plan["runs" if kind == "infer" else "train_runs"]
    ms = measure.median_ms(measure.alternate(fns, plan["warmup"], runs, device))
    report.add(f"{'infer' if kind == 'infer' else 'train_step'}_{tag}_ms", ms["ours"], ms["hf"], shape=shape, runs=runs)
    report.add(f"{kind}_images_per_s_{tag}", batch * 1e3 / ms["ours"], batch * 1e3 / ms["hf"], shape=shape)
    if device == "cuda":
        mem = {name: measure.cuda_peak_increase(fn)[0] for name, fn in fns.items()}
        report.add(f"{kind}_peak_mem_mb_{tag}", mem["ours"], mem["hf"], shape=shape)


def time_batches(report, ours, hf, plan, device: str, amp: bool) -> None:
    """Inference and a training step of `batch` images of `size` for each `plan["batched"]` entry: milliseconds,
    images/s and, on CUDA, the allocator's peak above the loaded model."""
    for batch, size in plan.get("batched", []):
        report.log(f"inference and training step {batch}x3x{size[0]}x{size[1]}")
        images, targets = make_images(batch, size, device=device), make_targets(batch, device=device)
        ours.eval(), hf.eval()
        with torch.no_grad(), autocast(device, amp):
            _time_batch(report, "infer", {"ours": ours_infer(ours, images), "hf": hf_infer(hf, images)}, plan,
                        device, batch, size)
        ours.train(), hf.train()
        steps = {"ours": ours_train_step(ours, images, targets, amp), "hf": hf_train_step(hf, images, targets, amp)}
        _time_batch(report, "train", steps, plan, device, batch, size)
        del steps
    ours.eval(), hf.eval()


def time_synthetic_training(report, plan, device: str, amp: bool, cpu_time: bool = False) -> None:
    """The `make train` model's step (from detectron2 inputs, its own optimizer, clip 1.0) vs HF's same size."""
    from detectron2.config import instantiate

    batch, size = plan["synthetic"]
    shape = f"{batch}x3x{size[0]}x{size[1]}"
    report.log(f"synthetic-size training step {shape}")
    hf = hf_synthetic()
    hf.to(device).train()
    images, targets = make_images(batch, size, device=device), make_targets(batch, device=device, num_classes=5,
                                                                             sizes=[1 + i % 6 for i in range(batch)])
    model, cfg = ours_synthetic()
    model.to(device).train()
    cfg.optimizer.params.model = model
    clip = cfg.train.clip_grad.max_norm
    steps = {
        "ours": ours_full_train_step(model, as_batched_inputs(images, targets), amp,
                                     optimizer=instantiate(cfg.optimizer), clip_max_norm=clip),
        "hf": hf_train_step(hf, images, targets, amp,
                            optimizer=adamw(hf, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay),
                            clip_max_norm=clip),
    }
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("ours", model), ("hf", hf))}
    clock = time.process_time if cpu_time else time.perf_counter
    times = measure.alternate(steps, plan["warmup"], plan["synthetic_runs"], device, clock=clock)
    ms = measure.median_ms(times)
    report.add("synthetic_train_step_ms", ms["ours"], ms["hf"], shape=shape, runs=plan["synthetic_runs"],
               params=params, clock="process CPU time" if cpu_time else "wall")


def flop_efficiency(report, ours, hf, images: torch.Tensor, gemm: float) -> None:
    report.log("FLOPs (fvcore)")
    flops = {
        "ours": measure.count_flops(ours, lambda m, x: ours_infer(m, x)(), images),
        "hf": measure.count_flops(hf, lambda m, x: hf_infer(m, x)(), images),
    }
    shape = "x".join(map(str, images.shape))
    report.add("gflops", flops["ours"] / 1e9, flops["hf"] / 1e9, shape=shape)
    # Both are credited with the same work, the smaller count: extra FLOPs (our zero-padded attention values, our
    # per-layer class logits) must not count as speed.
    model_flops = min(flops.values())
    infer = next(r for r in report.rows if r["metric"] == "infer_640_ms")
    achieved = {k: model_flops / (infer[k] / 1e3) / 1e9 for k in flops}
    report.add("achieved_gflops", achieved["ours"], achieved["hf"], shape=shape)
    report.add("gemm_gflops", gemm, None, matrix="2048x2048x2048 fp32")
    report.add("gemm_efficiency", achieved["ours"] / gemm, achieved["hf"] / gemm)


def peak_memory(report, ours, hf, plan, threads: int, device: str, amp: bool) -> None:
    """Peak memory increase of inference and of training, same weights: on the CPU each model in its own fresh
    process (RSS), on CUDA in this process (the CUDA allocator's peak)."""
    if device == "cuda":
        report.log("peak memory (CUDA allocator)")
        mem = cuda_memory(ours, hf, plan, amp)
    else:
        report.log("peak memory (one fresh process per model)")
        with tempfile.TemporaryDirectory() as tmp:
            mem = {}
            for name, model in (("ours", ours), ("hf", hf)):
                path = os.path.join(tmp, name + ".pth")
                torch.save(model.state_dict(), path)
                mem[name] = measure_memory(name, path, plan, threads, amp)
    size = plan["infer"][0]
    for mode, metric, shape in (("infer", "peak_mem_mb", f"1x3x{size[0]}x{size[1]}"),
                                ("train", "train_peak_mem_mb", "2x3x{}x{}".format(*plan["train"]))):
        report.add(metric, mem["ours"][mode][0], mem["hf"][mode][0], shape=shape, method=mem["ours"][mode][2],
                   baseline_mb={k: round(v[mode][1]) for k, v in mem.items()})


def compare_r50(report, plan, args, device: str, cpu: measure.CpuMonitor) -> bool:
    """The R50 rows; False (and no timings) when the two models disagree."""
    report.log(f"building both R50 models on {device}")
    hf = hf_r50().eval()
    ours = ours_r50(hf.state_dict(), hf_format=True).eval()
    hf.to(device), ours.to(device)

    # Agreement first (fp32): a speed-up of a model that computes something else is no speed-up.
    images0 = make_images(1, plan["infer"][0], device=device)
    with torch.no_grad():
        diff = measure.max_abs_diff(ours_infer(ours, images0)(), hf_infer(hf, images0)())
    report.add("max_abs_diff", diff, 0.0, shape="x".join(map(str, images0.shape)), tolerance=AGREEMENT_TOL)
    if not diff <= AGREEMENT_TOL:
        print(f"outputs differ from HF by {diff:.3g} > {AGREEMENT_TOL}: no speed comparison reported")
        return False

    gemm = [measure.gemm_gflops(device=device)]
    with cpu:
        time_inference(report, ours, hf, plan, device, args.amp)
        gemm.append(measure.gemm_gflops(device=device))
        time_training(report, ours, hf, plan, device, args.amp)
        time_batches(report, ours, hf, plan, device, args.amp)
    flop_efficiency(report, ours, hf, images0, statistics.median(gemm))
    peak_memory(report, ours, hf, plan, args.threads, device, args.amp)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write one JSON object per metric to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both models (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs (for the test suite)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both models run (default cpu)")
    parser.add_argument("--amp", action="store_true",
                        help="time under autocast (fp16 + GradScaler on CUDA, bf16 on the CPU); agreement stays fp32")
    parser.add_argument("--sizes", nargs="+", default=["r50", "synthetic"], choices=["r50", "synthetic"],
                        help="which model sizes to compare (default both)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the synthetic-size step in process CPU time (for a shared machine; use --threads 1)")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--infer-size", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--train-size", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        memory_worker(args)
        return 0

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    plan = QUICK if args.quick else GPU if device == "cuda" else FULL
    torch.set_num_threads(args.threads)
    report = measure.Report(args.quick)
    cpu = measure.CpuMonitor()
    if "r50" in args.sizes and not compare_r50(report, plan, args, device, cpu):
        measure.write_jsonl(args.json, report.rows)
        return 1
    if "synthetic" in args.sizes:
        time_synthetic_training(report, plan, device, args.amp, args.cpu_time)

    if "r50" in args.sizes:
        report.add("cpu_cores_busy_self", cpu.process_cores)
        report.add("cpu_cores_busy_others", cpu.other_cores)
        report.add("load_average", cpu.load_start[0], load_end=cpu.load_end[0])
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    title = (f"DAB-DETR: ours vs HuggingFace transformers ({', '.join(args.sizes)}), {where}"
             f"{', AMP' if args.amp else ', fp32'}{' (QUICK: small sizes, few runs)' if args.quick else ''}\n"
             f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    measure.print_table(title, report.rows, cpu if "r50" in args.sizes else None)
    measure.write_jsonl(args.json, report.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
