"""Measurement helpers for the benchmarks: alternating timings with warm-up (medians), peak memory (RSS in a fresh
process on the CPU, the allocator's peak on CUDA), FLOPs (fvcore) and a GEMM reference, the machine's load, and
a report of `{"metric", "ours", "hf", "ratio"}` rows.

Everything here takes plain callables, so any two models (or any two implementations) can be compared.
"""
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(fns: Dict[str, Callable], warmup: int, runs: int, device: str = "cpu",
              clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds per call of each function, called in turns (ABBA order, so drift hits both alike); each call is
    timed to the end of its device work. `clock`: wall time by default; `time.process_time` (this process's CPU
    time, all threads) is less disturbed by other processes on a shared machine (meaningful with 1 thread: idle
    worker threads spin)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else reversed(names):
            synchronize(device)
            start = clock()
            fns[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return times


def count_page_faults(fns: Dict[str, Callable]) -> Tuple[Dict[str, Callable], Dict[str, List[float]]]:
    """`fns` wrapped to record, per call, the MiB of memory this process touched for the first time (minor page
    faults: fresh allocations the C library got from the kernel), in call order."""
    faults = {name: [] for name in fns}
    page_mib = resource.getpagesize() / 2 ** 20

    def wrapped(name: str, fn: Callable) -> Callable:
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            result = fn()
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * page_mib)
            return result
        return run

    return {name: wrapped(name, fn) for name, fn in fns.items()}, faults


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


def _rss_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_increase(run: Callable, calls: int = 2) -> Tuple[float, float, str]:
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


def cuda_peak_increase(run: Callable, calls: int = 2) -> Tuple[float, float, str]:
    """`peak_rss_increase` for the CUDA allocator: (peak allocated above the current allocation, current), MiB."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(calls):
        run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20, baseline / 2**20, "torch.cuda.max_memory_allocated"


def median_ms(times: Dict[str, List[float]]) -> Dict[str, float]:
    """Median milliseconds of each entry of `alternate`'s result."""
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def write_jsonl(path: Optional[str], rows: List[Dict]) -> None:
    if path:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def run_json_subprocess(cmd: List[str], what: str) -> Dict:
    """Run `cmd` (a fresh Python process, e.g. for a peak-memory measurement) and parse its last stdout line."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(title: str, rows: List[Dict], cpu: Optional[CpuMonitor] = None, file=sys.stdout,
                columns: Tuple[str, str] = ("ours", "HF")) -> None:
    """The rows as a readable table (`columns`: the names of the "ours" and "hf" values; their ratio) and the
    machine's load during the timings."""
    print(title, file=file)
    a, b = columns
    print(f"{'metric':<28} {'shape':<14} {a:>11} {b:>11} {a + '/' + b:>9}", file=file)
    for r in rows:
        fmt = "{:11.3g}" if r["metric"] in ("max_abs_diff",) else "{:11.2f}"
        hf = fmt.format(r["hf"]) if r["hf"] is not None else " " * 11
        ratio = f"{r['ratio']:9.3f}" if r["ratio"] is not None else ""
        print(f"{r['metric']:<28} {r.get('shape', ''):<14} {fmt.format(r['ours'])} {hf} {ratio}", file=file)
    if cpu is not None:
        print(f"load average {cpu.load_start[0]:.2f} -> {cpu.load_end[0]:.2f}; during timing this process kept "
              f"{cpu.process_cores:.2f} cores busy, others {cpu.other_cores:.2f}", file=file)
        if cpu.other_cores > 0.25:
            print("WARNING: other processes used the CPU during timing; rerun on a quiet machine for clean numbers",
                  file=file)
