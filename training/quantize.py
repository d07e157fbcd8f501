"""``medvision quantize``: INT8 candidates measured on this machine; the fastest that keeps its decisions ships.

Candidates (ONNX Runtime, after ``quant_pre_process``): dynamic INT8 (S8 weights, per channel), dynamic
U8 with ``reduce_range`` (for CPUs without VNNI), static QDQ calibrated on training-split images with
MinMax and Percentile ranges (per channel; the first convolution / patch embedding stays in float).
Each is timed side by side with the fp32 artifact on this machine and scored on the held-out split
against fp32: decision agreement at the artifact's threshold and AUROC. A candidate passes when it
agrees on >= 99 % of decisions and loses <= 0.01 AUROC; the fastest passing candidate that is faster
than fp32 is written, otherwise the fp32 artifact is, and the report says why. (The clinical promotion
gate against the teacher, with paired bootstrap intervals, is separate: M4 section 4.)
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from medvision.artifact import METADATA_KEY, decode, encode
from medvision.data import load_rows, read_split
from medvision.errors import ArtifactError, ConfigError
from medvision.metrics import auroc
from medvision.preprocess import Preprocess, normalize
from medvision.training.dataset import decode_all
from medvision.training.export import load_run

log = logging.getLogger(__name__)
MIN_AGREEMENT = 0.99
MAX_AUROC_DROP = 0.01


class _Reader:
    """Calibration batches for ``quantize_static`` (one image per call)."""

    def __init__(self, x: np.ndarray, name: str) -> None:
        self._it = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def _inputs(run: Path, pre: Preprocess, subset: str, limit: int | None, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    cfg, _, _, _ = load_run(run)
    split = read_split(run / "split.csv")
    rows = [r for r in load_rows(cfg.data.labels_csv, cfg.data.image_dir, cfg.data.manifest)
            if split.get(r.patient_id) == subset]
    if limit:
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    images, kept = decode_all(rows, pre, f"decode {subset}", show_progress, cfg.data.cache_dir, cfg.data.cache,
                              cfg.data.decode_workers)
    x = np.stack([normalize(np.asarray(images[i]), pre.cfg.mean, pre.cfg.std)[None] for i in range(len(images))])
    return x.astype(np.float32), np.array([r.label for r in kept])


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _latency_ms(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    name = sess.get_inputs()[0].name
    one = x[:1]
    for _ in range(3):
        sess.run(["probability"], {name: one})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(["probability"], {name: one})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def _probs(sess: ort.InferenceSession, x: np.ndarray, batch: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(["probability"], {name: x[i : i + batch]})[0][:, 0] for i in range(0, len(x), batch)])


@contextmanager
def _quiet_root_logger():
    """The quantizers log every tensor at INFO on the root logger and print calibration progress to
    stdout; keep stdout for the command's JSON result."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


def _first_conv(model: onnx.ModelProto) -> list[str]:
    for node in model.graph.node:
        if node.op_type == "Conv":
            return [node.name]
    return []


def quantize_artifact(artifact: str | Path, run_dir: str | Path, out: str | Path, calibration_images: int = 64,
                      runs: int = 30, threads: int = 0, show_progress: bool = True) -> dict:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    artifact, run, out = Path(artifact), Path(run_dir), Path(out)
    if not artifact.is_file():
        raise ArtifactError(f"no artifact at {artifact}: run 'medvision export' first")
    proto = onnx.load(str(artifact))
    meta = decode({p.key: p.value for p in proto.metadata_props})
    pre = Preprocess(meta.preprocess)
    calib, _ = _inputs(run, pre, "train", calibration_images, show_progress)
    x_test, y_test = _inputs(run, pre, "test", None, show_progress)
    if len(set(y_test)) < 2:
        raise ConfigError("the test split needs both classes to compare candidates")

    work = Path(tempfile.mkdtemp(prefix="mv-quant-"))
    try:
        prepped = work / "pre.onnx"
        with _quiet_root_logger():
            quant_pre_process(str(artifact), str(prepped))
        first_conv = _first_conv(onnx.load(str(prepped)))
        ops = ["MatMul", "Gemm", "Conv"]
        builders = {
            "dynamic_s8": lambda p: quantize_dynamic(prepped, p, per_channel=True, weight_type=QuantType.QInt8,
                                                     op_types_to_quantize=["MatMul", "Gemm"]),
            "dynamic_u8_reduce_range": lambda p: quantize_dynamic(prepped, p, per_channel=True, reduce_range=True,
                                                                  weight_type=QuantType.QUInt8,
                                                                  op_types_to_quantize=["MatMul", "Gemm"]),
            "static_qdq_minmax": lambda p: quantize_static(
                prepped, p, _Reader(calib, meta.input.name), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                nodes_to_exclude=first_conv, calibrate_method=CalibrationMethod.MinMax),
            "static_qdq_percentile": lambda p: quantize_static(
                prepped, p, _Reader(calib, meta.input.name), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                nodes_to_exclude=first_conv, calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": 99.99}),
        }
        threads = threads or 0
        fp32 = _session(artifact, threads)
        p32 = _probs(fp32, x_test)
        base = {"latency_ms": _latency_ms(fp32, x_test, runs), "auroc": auroc(y_test, p32),
                "size_mb": artifact.stat().st_size / 1e6}
        candidates = {}
        for name, build in builders.items():
            path = work / f"{name}.onnx"
            try:
                with _quiet_root_logger():
                    build(path)
                sess = _session(path, threads)
                p = _probs(sess, x_test)
                lat = _latency_ms(sess, x_test, runs)
            except Exception as exc:  # a quantizer or kernel gap: report it, try the others
                candidates[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            agree = float(np.mean((p >= meta.threshold) == (p32 >= meta.threshold)))
            auc = auroc(y_test, p)
            candidates[name] = {
                "latency_ms": lat, "speedup": base["latency_ms"] / lat, "auroc": auc,
                "auroc_drop": base["auroc"] - auc, "agreement": agree,
                "max_probability_difference": float(np.abs(p - p32).max()), "size_mb": path.stat().st_size / 1e6,
                "passes": agree >= MIN_AGREEMENT and base["auroc"] - auc <= MAX_AUROC_DROP,
            }
        passing = [n for n, c in candidates.items() if c.get("passes") and c["speedup"] > 1.0]
        chosen = max(passing, key=lambda n: candidates[n]["speedup"]) if passing else "fp32"
        if chosen == "fp32":
            reason = ("no INT8 candidate was both faster than fp32 here and within the accuracy limits"
                      if candidates else "no candidate could be built")
        else:
            c = candidates[chosen]
            reason = (f"fastest candidate within the limits: {c['speedup']:.2f}x faster than fp32, "
                      f"{100 * c['agreement']:.1f} % decisions agree, AUROC drop {c['auroc_drop']:+.4f}")
        report = {"artifact": str(artifact), "threads": threads or "all", "test_images": len(y_test),
                  "calibration_images": len(calib), "fp32": base, "candidates": candidates, "chosen": chosen,
                  "reason": reason, "limits": {"min_agreement": MIN_AGREEMENT, "max_auroc_drop": MAX_AUROC_DROP}}
        src = artifact if chosen == "fp32" else work / f"{chosen}.onnx"
        model = onnx.load(str(src))
        meta = meta.model_copy(update={"quantization": {
            "format": chosen, "reason": reason,
            "speedup_vs_fp32": 1.0 if chosen == "fp32" else candidates[chosen]["speedup"],
            "agreement_with_fp32": 1.0 if chosen == "fp32" else candidates[chosen]["agreement"],
        }})
        del model.metadata_props[:]
        model.metadata_props.add(key=METADATA_KEY, value=encode(meta))
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.with_suffix(".quantize.json").write_text(json.dumps(report, indent=2))
    log.info("quantize: %s (%s)", chosen, reason)
    return report
