"""Score ONNX artifacts on a run's images with ONNX Runtime: shared by quantize, gate and bench.

Inputs go through the artifact's own preprocessing (from its metadata) and the decode-once cache of
the run that supplies the images, so every candidate model sees exactly the same pixels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from medvision.config import RunConfig
from medvision.cores import physical_cores
from medvision.data import ImageRow, read_split
from medvision.manifest import load_rows
from medvision.preprocess import Preprocess
from medvision.training.dataset import decode_all


def split_rows(cfg: RunConfig, run: Path, subset: str) -> list[ImageRow]:
    """The rows of ``subset`` in the run's own split.csv."""
    split = read_split(run / "split.csv")
    return [r for r in load_rows(cfg.data.labels_csv, cfg.data.image_dir, cfg.data.manifest)
            if split.get(r.patient_id) == subset]


def model_inputs(rows: list[ImageRow], pre: Preprocess, cfg: RunConfig, desc: str,
                 show_progress: bool) -> tuple[np.ndarray, list[ImageRow]]:
    """Normalised [N, 1, H, W] float32 inputs for ``rows`` (unreadable ones dropped) and the rows kept."""
    images, kept = decode_all(rows, pre, desc, show_progress, cfg.data.cache_dir, cfg.data.cache,
                              cfg.data.decode_workers)
    size = pre.cfg.image_size
    if not kept:
        return np.zeros((0, 1, size, size), np.float32), kept
    x = np.stack([pre.finish(images[i]) for i in range(len(kept))])
    return x.astype(np.float32), kept


def session(path: str | Path, threads: int = 0, providers: list[str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session on ``threads`` intra-op threads (0: one per physical core this process may use)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()  # not ONNX Runtime's default: see physical_cores
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def probabilities(sess: ort.InferenceSession, x: np.ndarray, batch: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    if len(x) == 0:
        return np.zeros(0)
    return np.concatenate([sess.run(["probability"], {name: x[i : i + batch]})[0][:, 0]
                           for i in range(0, len(x), batch)])


def latency_ms(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    """Median wall time of one single-image run (after three warm-up runs)."""
    return paired_latency_ms([sess], x, runs)[0]


def paired_latency_ms(sessions: list[ort.InferenceSession], x: np.ndarray, runs: int,
                      min_seconds: float = 0.5) -> list[float]:
    """Median single-image latency of each session, their runs interleaved (a, b, a, b, …) so that load or
    clock changes on a shared machine hit every model alike; at least ``runs`` rounds and ``min_seconds``."""
    one = x[:1]
    names = [s.get_inputs()[0].name for s in sessions]
    for s, n in zip(sessions, names, strict=True):
        for _ in range(3):
            s.run(["probability"], {n: one})
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < runs or (time.perf_counter() - start < min_seconds and len(times[0]) < 50 * runs):
        for k, (s, n) in enumerate(zip(sessions, names, strict=True)):
            t = time.perf_counter()
            s.run(["probability"], {n: one})
            times[k].append(time.perf_counter() - t)
    return [1000 * float(np.median(t)) for t in times]
