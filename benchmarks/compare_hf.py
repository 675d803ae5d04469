"""Our DAB-DETR R50 vs HuggingFace `DabDetrForObjectDetection`: speed, memory and FLOP efficiency, same weights.

    python benchmarks/compare_hf.py [--json results.jsonl] [--threads 2] [--quick] [--device cuda] [--amp]

One process builds both models (HF's with random weights, ours loaded from it by `dab_detr.checkpoint.hf`), checks
that their outputs agree to 1e-4 on the benchmark input (otherwise it reports no timings and exits 1), then times
them alternately (ABBA order, medians after warm-up, the same input and thread count):
- inference, 1x3x640x640 and 1x3x800x1333 (`forward_raw` vs HF `forward`: both return logits and boxes);
- one training step, 2x3x512x512 with the same targets: forward + loss + backward + AdamW step, the stem frozen in
  both (our `freeze_at=1`), dropout 0, auxiliary losses on, HF's class-loss weight set to ours (1);
- peak memory: each model in a fresh subprocess that loads the same weights, returns freed heap to the OS
  (`malloc_trim`), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs two inferences (or two
  training steps) and reports the peak RSS above the loaded-model baseline;
- FLOPs (fvcore, one multiply-add = 2 FLOPs) and the achieved GFLOP/s next to a plain fp32 GEMM's GFLOP/s
  measured in the same run.
The machine's load (load average, busy cores outside this process) is recorded: rerun when others were busy.

`--device cuda` runs the same comparison on a GPU (timings synchronised with the device, peak memory from the CUDA
allocator in this process, the GEMM on the GPU) and adds a training step at 2x3x800x1333; every run also reports
inference FPS and training images/s. `--amp` times both models under autocast (fp16 with a GradScaler on CUDA,
bf16 on the CPU); the output agreement is always checked in fp32 first.
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

NUM_CLASSES = 80
AGREEMENT_TOL = 1e-4
FULL = {"infer": [(640, 640), (800, 1333)], "train": (512, 512), "warmup": 2, "runs": 7, "train_runs": 5}
QUICK = {"infer": [(96, 96)], "train": (64, 64), "warmup": 1, "runs": 2, "train_runs": 2}
GPU = {"infer": [(640, 640), (800, 1333)], "train": (512, 512), "train_extra": [(800, 1333)], "warmup": 5,
       "runs": 30, "train_runs": 20}


# --- models ------------------------------------------------------------------------------------------------------
def build_hf(seed: int = 0):
    """HF DAB-DETR R50 with random weights, our training settings, and realistic (non-identity) FrozenBN statistics."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.DabDetrConfig(
        use_pretrained_backbone=False, num_labels=NUM_CLASSES, dropout=0.0, auxiliary_loss=True,
        cls_loss_coefficient=1,  # ours (HF's default is 2)
    )
    model = transformers.DabDetrForObjectDetection(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("FrozenBatchNorm2d"):
                module.weight.uniform_(0.5, 1.0, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
        last = model.bbox_predictor.layers[-1]  # zero-init would make every box its anchor
        last.weight.normal_(0, 0.02, generator=g)
        model.model.query_refpoint_embeddings.weight.normal_(0, 1, generator=g)
    # The same trainable set as ours (`freeze_at=1`): the stem convolution is frozen; FrozenBN has no parameters.
    model.model.backbone.conv_encoder.model._backbone.conv1.weight.requires_grad_(False)
    return model


def build_ours(state_dict: Dict[str, torch.Tensor], hf_format: bool):
    """Our DAB-DETR R50 (configs/models/dab_detr_r50.py) with HF's inverse-sigmoid eps, loaded with `state_dict`."""
    from detectron2.config import LazyConfig, instantiate

    from dab_detr.checkpoint.hf import load_hf_state_dict

    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "models", "dab_detr_r50.py"))
    cfg.model.num_classes = NUM_CLASSES
    cfg.model.head.inverse_sigmoid_eps = 1e-5  # HF's value
    model = instantiate(cfg.model)
    if hf_format:
        load_hf_state_dict(model, state_dict)
    else:
        model.load_state_dict(state_dict)
    return model


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- inputs and steps --------------------------------------------------------------------------------------------
def make_images(batch: int, size: Tuple[int, int], seed: int = 3, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(device)


def make_targets(batch: int, seed: int = 4, device: str = "cpu") -> List[Dict[str, torch.Tensor]]:
    """Targets in our format (labels, normalised cxcywh boxes): 3, 5, ... boxes per image."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for i in range(batch):
        n = 3 + 2 * i
        center = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "boxes": torch.cat((center, size), dim=1),
        })
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def autocast(device: str, enabled: bool):
    """Mixed precision as our trainer does it: fp16 on CUDA (with a GradScaler in training), bf16 on the CPU."""
    return torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16, enabled=enabled)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours_infer(model, images: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    from detectron2.structures import ImageList

    image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])

    def run():
        out = model.forward_raw(image_list)
        return out["pred_logits"], out["pred_boxes"]

    return run


def hf_infer(model, images: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    pixel_mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)

    def run():
        out = model(pixel_values=images, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes

    return run


def _adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)


def _train_step(model, loss_fn: Callable[[], torch.Tensor], amp: bool) -> Callable[[], torch.Tensor]:
    """forward + loss (`loss_fn`, under autocast if `amp`) + backward + AdamW step; a GradScaler for fp16."""
    device = next(model.parameters()).device.type
    optimizer = _adamw(model)
    scaler = torch.amp.GradScaler(device) if amp and device == "cuda" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    return step


def ours_train_step(model, images: torch.Tensor, targets, amp: bool = False) -> Callable[[], torch.Tensor]:
    from detectron2.structures import ImageList

    image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])
    return _train_step(model, lambda: sum(model.criterion(model.forward_raw(image_list), targets).values()), amp)


def hf_train_step(model, images: torch.Tensor, targets, amp: bool = False) -> Callable[[], torch.Tensor]:
    pixel_mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long, device=images.device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    return _train_step(model, lambda: model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss, amp)


# --- measurement -------------------------------------------------------------------------------------------------
def alternate(fns: Dict[str, Callable], warmup: int, runs: int, device: str = "cpu") -> Dict[str, List[float]]:
    """Seconds per call of each function, called in turns (ABBA order, so drift hits both alike); each call is
    timed to the end of its device work."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def gemm_gflops(n: int = 2048, runs: int = 5, device: str = "cpu") -> float:
    """GFLOP/s of a plain fp32 n x n x n matmul (2 n^3 FLOPs) on `device`, median of `runs`."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    times = alternate({"gemm": lambda: a @ b}, 1, runs, device)["gemm"]
    return 2 * n**3 / statistics.median(times) / 1e9


def _sdpa_flop_handle(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention: q k^T and attn v, in multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(model, fn: Callable, images: torch.Tensor) -> float:
    """FLOPs (2 x fvcore's multiply-adds) of `fn(model, images)`; elementwise ops are not counted (fvcore's way)."""
    import logging

    from fvcore.nn import FlopCountAnalysis

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model  # a submodule, so that the tracer sees its weights as parameters

        def forward(self, x):
            return fn(self.model, x)

    logging.getLogger("fvcore").setLevel(logging.ERROR)  # "unsupported operator" notes for elementwise ops
    with torch.no_grad():
        analysis = FlopCountAnalysis(Wrapper(), (images,))
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return 2.0 * analysis.total()


class CpuMonitor:
    """CPU use during a block: cores busy in this process and in the whole machine (/proc/stat), load averages."""

    def __enter__(self):
        self.load_start = os.getloadavg()
        self.wall, self.proc, self.machine = time.perf_counter(), _process_cpu(), _machine_busy()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        busy, total = (b - a for a, b in zip(self.machine, _machine_busy()))
        self.process_cores = (_process_cpu() - self.proc) / wall
        self.machine_cores = (busy / total * (os.cpu_count() or 1)) if total > 0 else float("nan")
        self.other_cores = max(0.0, self.machine_cores - self.process_cores)
        self.load_end = os.getloadavg()
        return False


def _process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _machine_busy() -> Tuple[float, float]:
    """(busy, total) jiffies over all CPUs; (0, 0) where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


# --- peak memory in a fresh process ------------------------------------------------------------------------------
def _rss_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_increase(run: Callable, calls: int = 2) -> Tuple[float, float, str]:
    """(peak RSS increase over the current RSS while calling `run` `calls` times, baseline RSS, method), in MiB."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so reused heap cannot hide a peak
    baseline = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the kernel's peak RSS) to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (lifetime peak)"
    for _ in range(calls):  # the second call sees warmed-up caches and allocated optimizer state
        run()
    peak = _rss_kb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - baseline) / 1024, baseline / 1024, method


def memory_worker(args) -> None:
    """Subprocess entry: load one model, print the peak RSS increase of inference, then of training, as JSON."""
    torch.set_num_threads(args.threads)
    state = torch.load(args.weights, weights_only=True)
    if args.worker == "ours":
        model = build_ours(state, hf_format=False)
        infer, train_step = ours_infer, ours_train_step
    else:
        model = build_hf()
        model.load_state_dict(state)
        infer, train_step = hf_infer, hf_train_step
    del state
    result = {}
    model.eval()
    with torch.no_grad(), autocast("cpu", args.amp):
        result["infer"] = _peak_rss_increase(infer(model, make_images(1, tuple(args.infer_size))))
    model.train()
    step = train_step(model, make_images(2, tuple(args.train_size)), make_targets(2), args.amp)
    result["train"] = _peak_rss_increase(step)
    print(json.dumps(result))


def measure_memory(name: str, weights: str, plan, threads: int, amp: bool) -> Dict[str, Tuple[float, float, str]]:
    """Run `memory_worker` for model `name` in a fresh Python process."""
    infer_size, train_size = plan["infer"][0], plan["train"]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--weights", weights, "--threads", str(threads),
           "--infer-size", str(infer_size[0]), str(infer_size[1]),
           "--train-size", str(train_size[0]), str(train_size[1])] + (["--amp"] if amp else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report ------------------------------------------------------------------------------------------------------
def max_abs_diff(a: Tuple[torch.Tensor, ...], b: Tuple[torch.Tensor, ...]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


class Report:
    """Rows `{"metric", "ours", "hf", "ratio" (ours / hf), ...}`, progress on stderr."""

    def __init__(self, quick: bool):
        self.rows: List[Dict] = []
        self.quick = quick
        self.start = time.perf_counter()

    def add(self, metric: str, ours_value: float, hf_value: Optional[float] = None, **extra) -> Dict:
        row = {"metric": metric, "ours": ours_value, "hf": hf_value}
        row["ratio"] = ours_value / hf_value if hf_value not in (None, 0) else None
        row.update(extra)
        if self.quick:
            row["quick"] = True
        self.rows.append(row)
        return row

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def time_inference(report: Report, ours, hf, plan, device: str, amp: bool) -> None:
    with torch.no_grad(), autocast(device, amp):
        for i, size in enumerate(plan["infer"]):
            report.log(f"inference 1x3x{size[0]}x{size[1]}")
            images = make_images(1, size, device=device)
            times = alternate({"ours": ours_infer(ours, images), "hf": hf_infer(hf, images)},
                              plan["warmup"], plan["runs"], device)
            shape = f"1x3x{size[0]}x{size[1]}"
            name = "infer_640_ms" if i == 0 else f"infer_{size[0]}x{size[1]}_ms"
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            report.add(name, ms["ours"], ms["hf"], shape=shape, runs=plan["runs"])
            report.add(f"infer_fps_{size[0]}x{size[1]}", 1e3 / ms["ours"], 1e3 / ms["hf"], shape=shape)


def time_training(report: Report, ours, hf, plan, device: str, amp: bool) -> None:
    ours.train(), hf.train()
    trainable = (trainable_count(ours), trainable_count(hf))
    if trainable[0] != trainable[1]:
        raise RuntimeError(f"trainable parameter counts differ: ours {trainable[0]}, HF {trainable[1]}")
    for i, size in enumerate([plan["train"]] + plan.get("train_extra", [])):
        report.log(f"training step 2x3x{size[0]}x{size[1]}")
        images, targets = make_images(2, size, device=device), make_targets(2, device=device)
        steps = {"ours": ours_train_step(ours, images, targets, amp), "hf": hf_train_step(hf, images, targets, amp)}
        first_loss = {name: float(step()) for name, step in steps.items()}  # same weights: the same loss expected
        times = alternate(steps, plan["warmup"] - 1, plan["train_runs"], device)
        shape = f"2x3x{size[0]}x{size[1]}"
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        name = "train_step_512_ms" if i == 0 else f"train_step_{size[0]}x{size[1]}_ms"
        report.add(name, ms["ours"], ms["hf"], shape=shape, runs=plan["train_runs"], trainable_params=trainable[0])
        report.add(f"train_images_per_s_{size[0]}x{size[1]}", 2e3 / ms["ours"], 2e3 / ms["hf"], shape=shape)
        if i == 0:
            report.add("train_first_loss", first_loss["ours"], first_loss["hf"])
    ours.eval(), hf.eval()


def flop_efficiency(report: Report, ours, hf, images: torch.Tensor, gemm: float) -> None:
    report.log("FLOPs (fvcore)")
    flops = {
        "ours": count_flops(ours, lambda m, x: ours_infer(m, x)(), images),
        "hf": count_flops(hf, lambda m, x: hf_infer(m, x)(), images),
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


def _cuda_peak_increase(run: Callable, calls: int = 2) -> Tuple[float, float, str]:
    """`_peak_rss_increase` for the CUDA allocator: (peak allocated above the current allocation, current), MiB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(calls):
        run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20, baseline / 2**20, "torch.cuda.max_memory_allocated"


def cuda_memory(ours, hf, plan, amp: bool) -> Dict[str, Dict[str, Tuple[float, float, str]]]:
    """Peak CUDA memory of inference and of training, in this process (the allocator counts per call)."""
    mem = {}
    for name, model, infer, train_step in (("ours", ours, ours_infer, ours_train_step), ("hf", hf, hf_infer,
                                                                                        hf_train_step)):
        model.eval()
        with torch.no_grad(), autocast("cuda", amp):
            infer_mem = _cuda_peak_increase(infer(model, make_images(1, plan["infer"][0], device="cuda")))
        model.train()
        step = train_step(model, make_images(2, plan["train"], device="cuda"), make_targets(2, device="cuda"), amp)
        mem[name] = {"infer": infer_mem, "train": _cuda_peak_increase(step)}
        model.eval()
    return mem


def peak_memory(report: Report, ours, hf, plan, threads: int, device: str, amp: bool) -> None:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write one JSON object per metric to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both models (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs (for the test suite)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both models run (default cpu)")
    parser.add_argument("--amp", action="store_true",
                        help="time under autocast (fp16 + GradScaler on CUDA, bf16 on the CPU); agreement stays fp32")
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
    report = Report(args.quick)
    report.log(f"building both models on {device}")
    hf = build_hf().eval()
    ours = build_ours(hf.state_dict(), hf_format=True).eval()
    hf.to(device), ours.to(device)

    # Agreement first (fp32): a speed-up of a model that computes something else is no speed-up.
    images0 = make_images(1, plan["infer"][0], device=device)
    with torch.no_grad():
        diff = max_abs_diff(ours_infer(ours, images0)(), hf_infer(hf, images0)())
    report.add("max_abs_diff", diff, 0.0, shape="x".join(map(str, images0.shape)), tolerance=AGREEMENT_TOL)
    if not diff <= AGREEMENT_TOL:
        print(f"outputs differ from HF by {diff:.3g} > {AGREEMENT_TOL}: no speed comparison reported")
        _write(args.json, report.rows)
        return 1

    gemm = [gemm_gflops(device=device)]
    with CpuMonitor() as cpu:
        time_inference(report, ours, hf, plan, device, args.amp)
        gemm.append(gemm_gflops(device=device))
        time_training(report, ours, hf, plan, device, args.amp)
    flop_efficiency(report, ours, hf, images0, statistics.median(gemm))
    peak_memory(report, ours, hf, plan, args.threads, device, args.amp)

    report.add("cpu_cores_busy_self", cpu.process_cores)
    report.add("cpu_cores_busy_others", cpu.other_cores)
    report.add("load_average", cpu.load_start[0], load_end=cpu.load_end[0])
    _print_table(report.rows, args, cpu)
    _write(args.json, report.rows)
    return 0


def _print_table(rows: List[Dict], args, cpu: CpuMonitor) -> None:
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"DAB-DETR R50: ours vs HuggingFace transformers, same weights, {where}"
          f"{', AMP' if args.amp else ', fp32'}{' (QUICK: small sizes, few runs)' if args.quick else ''}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'metric':<28} {'shape':<14} {'ours':>11} {'HF':>11} {'ours/HF':>8}")
    for r in rows:
        fmt = "{:11.3g}" if r["metric"] in ("max_abs_diff",) else "{:11.2f}"
        hf = fmt.format(r["hf"]) if r["hf"] is not None else " " * 11
        ratio = f"{r['ratio']:8.3f}" if r["ratio"] is not None else ""
        print(f"{r['metric']:<28} {r.get('shape', ''):<14} {fmt.format(r['ours'])} {hf} {ratio}")
    print(f"load average {cpu.load_start[0]:.2f} -> {cpu.load_end[0]:.2f}; during timing this process kept "
          f"{cpu.process_cores:.2f} cores busy, others {cpu.other_cores:.2f}")
    if cpu.other_cores > 0.25:
        print("WARNING: other processes used the CPU during timing; rerun on a quiet machine for clean numbers")


def _write(path: Optional[str], rows: List[Dict]) -> None:
    if path:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
