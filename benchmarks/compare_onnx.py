"""onnxruntime (CPU) vs our PyTorch eager model: latency and peak memory of DAB-DETR R50 on one 640x640 image.

    python benchmarks/compare_onnx.py [--threads 2] [--size 640] [--runs 7] [--json results.jsonl] [--quick]

One process builds the R50 model (random weights with realistic FrozenBN statistics, 80 classes), exports it
with `dab_detr.export` (one dynamic ONNX file, opset 18: normalisation, padding mask, model and top-k inside),
checks that onnxruntime's detections equal the model's own `model([{"image": ...}])` (scores 1e-4, boxes 1e-3 px),
then times both end to end (image in, detections out) in turns (ABBA order, medians after warm-up) with the same
number of threads. Peak memory: each runtime in a fresh subprocess that loads the model, then reports the peak
RSS above the loaded-model baseline over two inferences. The machine's load is recorded alongside.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from measure import CpuMonitor, alternate, median_ms, peak_rss_increase, write_jsonl  # noqa: E402
from models import randomize_frozen_bn_and_prelu  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "dab_detr_r50_50ep.py")


def build_r50(seed: int = 0):
    """Inference-only R50 model; FrozenBN statistics and PReLU slopes drawn at random so nothing is an identity."""
    from detectron2.config import LazyConfig, instantiate

    import dab_detr  # noqa: F401

    cfg = LazyConfig.load(CONFIG)
    cfg.model.criterion, cfg.model.num_classes = None, 80
    torch.manual_seed(seed)
    model = instantiate(cfg.model).eval()
    randomize_frozen_bn_and_prelu(model, torch.Generator().manual_seed(seed + 1))
    return model


def make_image(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, size, size)).astype(np.float32)


def torch_runner(model, image: np.ndarray):
    tensor = torch.from_numpy(image)

    @torch.no_grad()
    def run():
        return model([{"image": tensor}])[0]["instances"]
    return run


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_runner(session, image: np.ndarray):
    feeds = {"images": image[None], "image_sizes": np.array([image.shape[1:]], dtype=np.int64)}
    return lambda: session.run(None, feeds)


def agreement(instances, outputs) -> tuple:
    """(max score difference rank by rank, max box difference in px of a one-to-one match with equal labels) of
    the detections the eager model keeps; detections whose scores tie within float noise may swap ranks."""
    from scipy.optimize import linear_sum_assignment

    boxes, scores, labels = (x[0] for x in outputs)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if int(keep.sum()) != len(instances):
        return float("inf"), float("inf")
    score = float(np.abs(scores[keep] - instances.scores.numpy()).max())
    cost = np.abs(boxes[keep][:, None] - instances.pred_boxes.tensor.numpy()[None]).max(-1)
    cost[labels[keep][:, None] != instances.pred_classes.numpy()[None]] = 1e9
    rows, cols = linear_sum_assignment(cost)
    return score, float(cost[rows, cols].max())


def memory_child(kind: str, path: str, size: int, threads: int) -> None:
    """Fresh process: load the model (`path`: state dict or ONNX file), print the peak RSS of two inferences."""
    image = make_image(size)
    torch.set_num_threads(threads)
    if kind == "pytorch":
        model = build_r50()
        model.load_state_dict(torch.load(path, map_location="cpu"))
        run = torch_runner(model, image)
    else:
        run = ort_runner(ort_session(path, threads), image)
    peak, baseline, method = peak_rss_increase(run, calls=2)
    print(json.dumps({"peak_mib": peak, "baseline_mib": baseline, "method": method}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=640, help="square image side (default 640)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON lines")
    parser.add_argument("--quick", action="store_true", help="a 96x96 image, 1 run: checks that it works")
    parser.add_argument("--memory-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.runs, args.warmup = 96, 1, 1
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], args.size, args.threads)
        return 0

    from dab_detr.export import export_onnx

    torch.set_num_threads(args.threads)
    model = build_r50()
    image = make_image(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, state_path = os.path.join(tmp, "r50.onnx"), os.path.join(tmp, "r50.pth")
        print("exporting ...", file=sys.stderr, flush=True)
        export_onnx(model, onnx_path)
        torch.save(model.state_dict(), state_path)
        session = ort_session(onnx_path, args.threads)
        run_torch, run_ort = torch_runner(model, image), ort_runner(session, image)
        score_diff, box_diff = agreement(run_torch(), run_ort())
        print(f"agreement: scores {score_diff:.2g}, boxes {box_diff:.2g} px", file=sys.stderr)
        if score_diff > 1e-4 or box_diff > 1e-3:
            print("onnxruntime and PyTorch disagree: no timings", file=sys.stderr)
            return 1
        with CpuMonitor() as cpu:
            ms = median_ms(alternate({"onnxruntime": run_ort, "pytorch": run_torch}, args.warmup, args.runs))
        memory = {}
        for kind, path in (("pytorch", state_path), ("onnxruntime", onnx_path)):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", kind, path,
                                   "--size", str(args.size), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            memory[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    shape = f"1x3x{args.size}x{args.size}"
    rows.append({"metric": "latency_ms", "shape": shape, "onnxruntime": ms["onnxruntime"], "pytorch": ms["pytorch"],
                 "ratio_ort_over_torch": ms["onnxruntime"] / ms["pytorch"]})
    rows.append({"metric": "peak_rss_increase_mib", "shape": shape, "onnxruntime": memory["onnxruntime"]["peak_mib"],
                 "pytorch": memory["pytorch"]["peak_mib"],
                 "ratio_ort_over_torch": memory["onnxruntime"]["peak_mib"] / memory["pytorch"]["peak_mib"]})
    rows.append({"metric": "loaded_model_rss_mib", "shape": shape,
                 "onnxruntime": memory["onnxruntime"]["baseline_mib"], "pytorch": memory["pytorch"]["baseline_mib"],
                 "ratio_ort_over_torch": memory["onnxruntime"]["baseline_mib"] / memory["pytorch"]["baseline_mib"]})
    print(f"DAB-DETR R50, {shape}, {args.threads} threads, {args.runs} runs (median), torch {torch.__version__}")
    print(f"{'metric':<24} {'onnxruntime':>12} {'pytorch':>10} {'ort/torch':>10}")
    for r in rows:
        print(f"{r['metric']:<24} {r['onnxruntime']:12.1f} {r['pytorch']:10.1f} {r['ratio_ort_over_torch']:10.3f}")
    print(f"agreement: scores {score_diff:.2g}, boxes {box_diff:.2g} px; memory: {memory['pytorch']['method']}")
    print(f"load during timings: this process {cpu.process_cores:.2f} cores, others {cpu.other_cores:.2f} cores, "
          f"load average {cpu.load_start[0]:.2f} -> {cpu.load_end[0]:.2f}")
    for r in rows:
        r.update(threads=args.threads, other_cores=cpu.other_cores, quick=args.quick)
    write_jsonl(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
