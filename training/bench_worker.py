"""One measurement of ``medvision bench``, run in its own process so its peak memory is its own.

Reads a JSON spec on stdin and writes a JSON result on stdout. The ONNX Runtime path imports neither
torch nor timm: its memory is what a serving process would hold.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM: unlike ``ru_maxrss`` it is not inherited from
    the parent that started the worker)."""
    return _status_mb("VmHWM")


def _time_batches(call, x: np.ndarray, batch_sizes: list[int], seconds: float, min_runs: int, sync=None) -> dict:
    out = {}
    for bs in batch_sizes:
        batch = np.ascontiguousarray(np.resize(x, (bs, *x.shape[1:])))
        for _ in range(2):  # warm-up: allocator, kernels, lazy initialisation
            call(batch)
        if sync:
            sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < seconds and len(times) < 500):
            t = time.perf_counter()
            call(batch)
            if sync:
                sync()
            times.append(time.perf_counter() - t)
        ms = 1000 * np.asarray(times)
        out[str(bs)] = {"images_per_s": bs * len(times) / float(np.sum(times)), "p50_ms": float(np.percentile(ms, 50)),
                        "p99_ms": float(np.percentile(ms, 99)), "runs": len(times)}
    return out


def seeded_inputs(size: int, n: int = 32, seed: int = 0) -> np.ndarray:
    """The seeded standard-normal images every model is timed on (and a CNN student calibrated on)."""
    return np.random.default_rng(seed).standard_normal((n, 1, size, size)).astype(np.float32)


def _inputs(spec: dict) -> np.ndarray:
    return seeded_inputs(spec["image_size"], seed=spec.get("seed", 0))


def run_ort(spec: dict) -> dict:
    import onnxruntime as ort

    baseline = _rss_mb()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = spec["threads"]
    opts.inter_op_num_threads = 1
    t = time.perf_counter()
    sess = ort.InferenceSession(spec["source"], opts, providers=spec.get("providers") or ["CPUExecutionProvider"])
    load = time.perf_counter() - t
    name = sess.get_inputs()[0].name
    x = _inputs(spec)

    def call(batch):
        sess.run(["probability"], {name: batch})

    results = _time_batches(call, x, spec["batch_sizes"], spec["seconds"], spec["min_runs"])
    return {"baseline_rss_mb": baseline, "peak_rss_mb": _peak_rss_mb(), "load_seconds": load,
            "providers": sess.get_providers(), "results": results, "torch_imported": "torch" in sys.modules}


def run_torch(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    baseline = _rss_mb()
    t = time.perf_counter()
    from medvision.training.bench import build_torch_model

    model = build_torch_model(spec["source"], spec["image_size"])
    device = torch.device(spec.get("device", "cpu"))
    model = model.to(device).eval()
    load = time.perf_counter() - t
    x = _inputs(spec)
    bf16 = spec.get("precision") == "bf16"

    def call(batch):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model(torch.from_numpy(batch).to(device, non_blocking=True))

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    results = _time_batches(call, x, spec["batch_sizes"], spec["seconds"], spec["min_runs"], sync)
    out = {"baseline_rss_mb": baseline, "peak_rss_mb": _peak_rss_mb(), "load_seconds": load, "results": results,
           "parameters": int(sum(p.numel() for p in model.parameters()))}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_matmul(spec: dict) -> dict:
    """Measured fp32 matmul GFLOP/s with the benchmark's thread count: the machine's practical ceiling."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    n = spec.get("n", 2048)
    out = {}
    for label, dtype in [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" else []):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < spec.get("seconds", 2.0):
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            reps += 1
        out[f"{label}_gflops"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    return out


def main() -> None:
    spec = json.loads(sys.stdin.read())
    run = {"ort": run_ort, "torch": run_torch, "matmul": run_matmul}[spec["kind"]]
    json.dump(run(spec), sys.stdout)


if __name__ == "__main__":
    main()
