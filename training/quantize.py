"""``medvision quantize``: INT8 candidates measured on this machine; the fastest that keeps its decisions ships.

Candidates (ONNX Runtime, after ``quant_pre_process``): dynamic INT8 (S8 weights, per channel), dynamic
U8 with ``reduce_range`` (for CPUs without VNNI), and static QDQ calibrated on training-split images with
MinMax, entropy (KL, from a fine histogram) and percentile ranges, per channel, with the sensitive nodes
(the first convolution, attention's activation-by-activation products) kept in float; one percentile
variant quantizes the attention products too, and one MinMax variant everything (the first convolution as
well, a large share of a CNN's time once the rest is INT8), to show what keeping them in float buys. Each
candidate is timed interleaved with the fp32 artifact (run for run, batch 1) on this machine and scored on the
held-out split against fp32: decision agreement at the artifact's threshold and AUROC. A candidate
passes when it agrees on >= 99 % of decisions and loses <= 0.01 AUROC; the fastest passing candidate
that is faster than fp32 is written, otherwise the fp32 artifact is, and the report says why. The
clinical promotion gate against the teacher is ``medvision.training.gate`` (``--teacher``).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import onnx

from medvision.artifact import QuantizationReport, read_artifact, sha256_file, write_artifact
from medvision.cores import physical_cores
from medvision.errors import ConfigError
from medvision.metrics import auroc
from medvision.preprocess import Preprocess
from medvision.training.criteria import DEFAULT
from medvision.training.export import read_run
from medvision.training.onnx_scoring import (
    latency_ms,
    model_inputs,
    paired_latency_ms,
    probabilities,
    session,
    split_rows,
)

log = logging.getLogger(__name__)
MIN_AGREEMENT = DEFAULT.min_agreement
MAX_AUROC_DROP = DEFAULT.max_auroc_drop
# dynamic INT8 quantizes the weight products, and ONNX Runtime's fused Attention (as QAttention) where exported
DYNAMIC_OPS = ["MatMul", "Gemm", "Attention"]


class _Reader:
    """Calibration batches for ``quantize_static`` (one image per call)."""

    def __init__(self, x: np.ndarray, name: str) -> None:
        self._it = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._it, None)


def _inputs(run: Path, pre: Preprocess, subset: str, limit: int | None, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    cfg, _, _ = read_run(run)
    rows = split_rows(cfg, run, subset)
    if limit:
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    x, kept = model_inputs(rows, pre, cfg, f"decode {subset}", show_progress)
    return x, np.array([r.label for r in kept])


@contextmanager
def _quiet_root_logger():
    """The quantizers log every tensor at INFO on the root logger and print calibration chatter to stdout;
    keep stdout for the command's JSON result and the console for medvision's own progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def sensitive_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Nodes that static INT8 commonly breaks in a ViT, to keep in float.

    - the first convolution (the patch embedding or conv stem sees raw pixel statistics);
    - matrix products of two activations (attention's Q·Kᵀ and softmax·V), whose ranges vary per image.
    LayerNorm, Softmax and the residual Adds are never quantized: only MatMul / Gemm / Conv are.
    """
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    first_conv = next(([n.name] for n in model.graph.node if n.op_type == "Conv"), [])
    attention = [n.name for n in model.graph.node
                 if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
    return {"first_conv": first_conv, "activation_matmuls": attention}


def _entropy_ranges(model: Path, ops: list[str], reader: _Reader, work: Path, bins: int) -> Path:
    """KL-divergence (entropy) activation ranges from a ``bins``-bin histogram, as a calibration cache file.
    (ONNX Runtime's threshold search is quadratic in ``bins`` and pure Python: ~0.25 s per tensor at 1024.)"""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(model, ops, augmented_model_path=str(work / "entropy_augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": max(bins, 256), "num_quantized_bins": 128})
    calibrator.collect_data(reader)
    path = work / "entropy_ranges.json"
    save_tensors_data(calibrator.compute_data(), path)
    return path


def quantize_artifact(artifact: str | Path, run_dir: str | Path, out: str | Path, calibration_images: int = 64,
                      runs: int = 30, threads: int = 0, show_progress: bool = True, entropy_bins: int = 1024) -> dict:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    artifact, run, out = Path(artifact), Path(run_dir), Path(out)
    meta = read_artifact(artifact)
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
        sensitive = sensitive_nodes(onnx.load(str(prepped)))
        in_float = sensitive["first_conv"] + sensitive["activation_matmuls"]
        ops = ["MatMul", "Gemm", "Conv"]

        def static(method, exclude, **extra):
            def build(p):
                reader = _Reader(calib, meta.input.name)
                if method == CalibrationMethod.Entropy:
                    # quantize_static's own entropy calibrator uses 128 histogram bins for 128 quantized bins,
                    # which leaves KL nothing to choose (its ranges equal MinMax); calibrate with more bins here
                    extra["calibration_cache_path"] = _entropy_ranges(prepped, ops, reader, work, entropy_bins)
                    reader = None
                quantize_static(prepped, p, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=ops, nodes_to_exclude=exclude, calibrate_method=method, **extra)
            build.kept_in_float = {kind: [n for n in nodes if n in exclude] for kind, nodes in sensitive.items()}
            return build

        builders = {
            "dynamic_s8": lambda p: quantize_dynamic(prepped, p, per_channel=True, weight_type=QuantType.QInt8,
                                                     op_types_to_quantize=DYNAMIC_OPS),
            "dynamic_u8_reduce_range": lambda p: quantize_dynamic(prepped, p, per_channel=True, reduce_range=True,
                                                                  weight_type=QuantType.QUInt8,
                                                                  op_types_to_quantize=DYNAMIC_OPS),
            "static_qdq_minmax": static(CalibrationMethod.MinMax, in_float),
            "static_qdq_entropy": static(CalibrationMethod.Entropy, in_float),
            "static_qdq_percentile": static(CalibrationMethod.Percentile, in_float,
                                            extra_options={"CalibPercentile": 99.99}),
            # the same with attention's activation products quantized too: shows what keeping them in float buys
            "static_qdq_percentile_all_matmuls": static(CalibrationMethod.Percentile, sensitive["first_conv"],
                                                        extra_options={"CalibPercentile": 99.99}),
            # nothing in float: a CNN's first convolution costs much once the rest is INT8
            "static_qdq_minmax_all_nodes": static(CalibrationMethod.MinMax, []),
        }
        threads = threads or 0
        fp32 = session(artifact, threads)
        p32 = probabilities(fp32, x_test)
        base = {"latency_ms": latency_ms(fp32, x_test, runs), "auroc": auroc(y_test, p32),
                "size_mb": artifact.stat().st_size / 1e6}
        candidates = {}
        for name, build in builders.items():
            path = work / f"{name}.onnx"
            try:
                with _quiet_root_logger():
                    build(path)
                sess = session(path, threads)
                p = probabilities(sess, x_test)
                lat32, lat = paired_latency_ms([fp32, sess], x_test, runs)
            except Exception as exc:  # a quantizer or kernel gap: report it, try the others
                candidates[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            agree = float(np.mean((p >= meta.threshold) == (p32 >= meta.threshold)))
            auc = auroc(y_test, p)
            candidates[name] = {
                "latency_ms": lat, "fp32_latency_ms_alongside": lat32, "speedup": lat32 / lat, "auroc": auc,
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
        report = {"artifact": str(artifact), "threads": threads or physical_cores(), "test_images": len(y_test),
                  "calibration_images": len(calib), "sensitive_nodes": sensitive, "fp32": base, "candidates": candidates, "chosen": chosen,
                  "reason": reason, "limits": {"min_agreement": MIN_AGREEMENT, "max_auroc_drop": MAX_AUROC_DROP}}
        src = artifact if chosen == "fp32" else work / f"{chosen}.onnx"
        meta = meta.model_copy(update={"quantization": QuantizationReport(
            format=chosen, reason=reason,
            speedup_vs_fp32=1.0 if chosen == "fp32" else candidates[chosen]["speedup"],
            agreement_with_fp32=1.0 if chosen == "fp32" else candidates[chosen]["agreement"],
            source=str(artifact.resolve()), source_sha256=sha256_file(artifact),
            kept_in_float=getattr(builders.get(chosen), "kept_in_float", {}))})
        write_artifact(onnx.load(str(src)), meta, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.with_suffix(".quantize.json").write_text(json.dumps(report, indent=2))
    log.info("quantize: %s (%s)", chosen, reason)
    return report
