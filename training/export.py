"""Export a trained run to a self-describing ONNX file and prove it computes what torch computes."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medvision import __version__
from medvision.artifact import (
    ArtifactMetadata,
    EvaluationSummary,
    InputContract,
    OperatingPoint,
    QuantizationReport,
    read_artifact,
    sha256_file,
    write_artifact,
)
from medvision.config import RunConfig
from medvision.data import read_split
from medvision.drift import Reference
from medvision.errors import ArtifactError, ConfigError, DicomError
from medvision.evaluation import Calibration
from medvision.manifest import load_rows
from medvision.preprocess import Preprocess
from medvision.registry import get_model_spec
from medvision.training.models import class_activation_map, create_model, has_exact_heatmap
from medvision.training.onnx_scoring import session
from medvision.training.ort_attention import DOMAIN, with_fused_attention

log = logging.getLogger(__name__)
OPSET = 17


class ExportParityError(ArtifactError):
    code = "export_parity"


class _WithProbability(torch.nn.Module):
    """Outputs the raw logit, the calibrated probability ``sigmoid(logit / temperature + bias)`` and, where the
    model has one, its exact heatmap (token / location logits), all from one forward pass."""

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature))
        self.register_buffer("bias", torch.tensor(float(bias)))
        self.has_heatmap = has_exact_heatmap(model)

    def forward(self, image: torch.Tensor):
        if hasattr(self.model, "scores"):  # token-pooled ViT: logit and heatmap from one pass
            logit, heat = self.model.scores(image)
        elif self.has_heatmap:
            heat = class_activation_map(self.model, image)
            logit = heat.mean(dim=(2, 3))
        else:
            logit = self.model(image)
        prob = torch.sigmoid(logit * self.inv_temperature + self.bias)
        return (logit, prob, heat) if self.has_heatmap else (logit, prob)


def load_calibration(run: Path, ckpt: Path) -> tuple[dict | None, EvaluationSummary | None]:
    """``RUN/calibration.json`` and the evaluation summary, if they were made for these weights."""
    path = run / "calibration.json"
    if not path.is_file():
        return None, None
    cal = json.loads(path.read_text())
    if cal.get("weights_sha256") != sha256_file(ckpt):
        log.warning("ignoring %s: it was fitted for other weights; run 'medvision evaluate' again", path)
        return None, None
    report = run / "evaluation" / "report.json"
    if not report.is_file():
        return cal, None
    r = json.loads(report.read_text())
    if r.get("calibration", {}).get("weights_sha256") != cal["weights_sha256"]:
        return cal, None
    m, breast = r["image_level"], r.get("breast_level") or {}
    return cal, EvaluationSummary(
        subset=r["subset"], images=m["n"], positives=m["positives"], auroc=m["auroc"], auroc_ci95=m["auroc_ci95"],
        sensitivity=m["sensitivity"], sensitivity_ci95=m["sensitivity_ci95"], specificity=m["specificity"],
        specificity_ci95=m["specificity_ci95"], ece=m["calibration"]["ece"], ece_ci95=m.get("ece_ci95"),
        breast_auroc=breast.get("auroc"),
        breast_auroc_ci95=breast.get("auroc_ci95"))


def load_reference(run: Path, ckpt: Path) -> Reference | None:
    """``RUN/reference.json`` (written by ``medvision evaluate``), if it was made for these weights."""
    path = run / "reference.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("weights_sha256") != sha256_file(ckpt):
        return None
    return Reference.model_validate(data["reference"])


def read_run(run_dir: Path) -> tuple[RunConfig, dict, Path]:
    """A run's config (from its checkpoint's metadata), metrics and checkpoint path, without loading weights."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "best.safetensors"
    if not ckpt.is_file():
        raise ArtifactError(f"no checkpoint at {ckpt}: run 'medvision train' first")
    with safe_open(str(ckpt), framework="pt") as fh:
        cfg = RunConfig.model_validate_json(fh.metadata()["config"])
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return cfg, metrics, ckpt


def load_run(run_dir: Path) -> tuple[RunConfig, torch.nn.Module, dict, Path]:
    cfg, metrics, ckpt = read_run(run_dir)
    model = create_model(cfg.model.model_copy(update={"pretrained": None}), cfg.preprocess.image_size,
                         weights_follow=True)
    model.load_state_dict(load_file(str(ckpt)))
    model.eval()
    return cfg, model, metrics, ckpt


def parity_inputs(cfg: RunConfig, run_dir: Path, n: int = 8) -> np.ndarray:
    """Real preprocessed images from the run's validation split (random ones if none can be read)."""
    pre = Preprocess(cfg.preprocess)
    batch = []
    if (cfg.data.manifest or cfg.data.labels_csv) and (run_dir / "split.csv").is_file():
        split = read_split(run_dir / "split.csv")
        try:
            rows = [r for r in load_rows(cfg.data.labels_csv, cfg.data.image_dir, cfg.data.manifest)
                    if split.get(r.patient_id) == "val"]
        except ConfigError:  # the labels moved since training: fall back below
            rows = []
        for r in rows:
            try:
                batch.append(pre(*pre.read(r.path)))
            except (DicomError, OSError):
                continue
            if len(batch) == n:
                break
    if not batch:
        log.warning("no validation DICOMs readable: parity is checked on random inputs only")
        size = cfg.preprocess.image_size
        return np.random.default_rng(0).standard_normal((n, 1, size, size)).astype(np.float32)
    return np.stack(batch)


def trace_onnx(wrapper: _WithProbability, out: Path, size: int, portable: bool = False) -> tuple[list[str], int]:
    """Trace ``wrapper`` to ``out`` (opset 17, dynamic batch); its output names and how many attention blocks
    were exported as ONNX Runtime's fused ``Attention`` (none when ``portable``: standard ONNX operators only)."""
    outputs = ["logit", "probability"] + (["heatmap"] if wrapper.has_heatmap else [])
    traced, fused = (wrapper, 0) if portable else with_fused_attention(wrapper)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export; the parity check against the
        # original model is what guarantees the graph, not the tracer's warnings.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            traced, (torch.zeros(2, 1, size, size),), str(out), input_names=["image"], output_names=outputs,
            opset_version=OPSET, dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]}, dynamo=False,
        )
    if fused:
        log.info("%d attention blocks exported as ONNX Runtime's fused %s.Attention", fused, DOMAIN)
    return outputs, fused


def export_run(run_dir: str | os.PathLike, out_path: str | os.PathLike, atol: float = 1e-4,
               portable: bool = False) -> ArtifactMetadata:
    """Write ``out_path`` (ONNX, opset 17, dynamic batch) with embedded metadata; check parity.

    Attention blocks are exported as ONNX Runtime's fused ``com.microsoft.Attention`` (faster, and
    quantizable as a whole) unless ``portable``, which keeps the graph to standard ONNX operators.

    Raises:
        ExportParityError: torch and onnxruntime disagree by more than ``atol`` on any logit; the
        file is removed so a wrong artifact can never be picked up.
    """
    run = Path(run_dir)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg, model, metrics, ckpt = load_run(run)
    size = cfg.preprocess.image_size
    calibration, evaluation = load_calibration(run, ckpt)
    cal = Calibration.of(calibration)
    wrapper = _WithProbability(model, cal.temperature, cal.bias).eval()
    _, fused = trace_onnx(wrapper, out, size, portable)
    spec = get_model_spec(cfg.model.name)
    meta = ArtifactMetadata(
        model_name=cfg.model.name,
        architecture=spec.timm_name,
        medvision_version=__version__,
        created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        preprocess=cfg.preprocess,
        input=InputContract(shape=["batch", 1, size, size]),
        labels=list(spec.labels),
        operating_points=[OperatingPoint(**op, calibrated=True) for op in calibration["operating_points"]]
        if calibration else [OperatingPoint(rule=metrics.get("operating_point", "default 0.5 (no validation metrics "
                                                              "found)"), threshold=float(metrics.get("threshold", 0.5)))],
        temperature=cal.temperature,
        calibration_bias=cal.bias,
        calibration_method=cal.method,
        calibration_prevalence=calibration.get("validation_prevalence") if calibration else None,
        outputs={"logit": "cancer logit, shape [batch, 1]",
                 "probability": f"sigmoid(logit / temperature + calibration_bias), {cal.method} scaling fitted on "
                                "validation" if calibration else "sigmoid(logit), not calibrated",
                 **({"heatmap": "per-location cancer logits [batch, 1, rows, cols] on the model-input grid; the "
                                "logit is their " + ("log-sum-exp mean" if hasattr(model, "pool") else "mean")
                                + (" averaged with the distillation token's logit"
                                   if getattr(model, "dist_head", None) is not None else "")}
                    if wrapper.has_heatmap else {})},
        evaluation=evaluation,
        weights_sha256=sha256_file(ckpt),
        split_sha256=sha256_file(run / "split.csv") if (run / "split.csv").is_file() else "",
        validation={k: float(metrics[k]) for k in ("val_auroc", "val_sensitivity", "val_specificity") if k in metrics},
        runtime_ops=[f"{DOMAIN}.Attention"] if fused else [],
        reference=load_reference(run, ckpt),
        training_data=f"manifest {Path(cfg.data.manifest).name}" if cfg.data.manifest
        else f"labels {Path(cfg.data.labels_csv).name if cfg.data.labels_csv else 'unknown'}",
    )
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    nodes_before = len(proto.graph.node)
    proto = _simplify(proto)
    log.info("graph simplified: %d -> %d nodes", nodes_before, len(proto.graph.node))
    proto.producer_name = "medvision"
    proto.producer_version = __version__
    proto.doc_string = f"{meta.model_name}: cancer probability for {meta.input.modality} images"
    write_artifact(proto, meta, out)

    x = parity_inputs(cfg, run)
    try:
        check_parity(wrapper, out, x, atol)
    except ExportParityError:
        out.unlink(missing_ok=True)
        raise
    return meta


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and redundant-node removal with onnxslim; the parity check below guards it."""
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed: the graph is exported unsimplified (pip install 'medvision-radiology[train]')")
        return proto
    slim = onnxslim.slim(proto)
    onnx.checker.check_model(slim)
    return slim


def check_parity(wrapper: torch.nn.Module, onnx_path: Path, x: np.ndarray, atol: float) -> float:
    """Compare torch and onnxruntime on ``x`` in one batch and one image at a time (dynamic batch)."""
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(torch.from_numpy(x))]
    sess = session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    got_batch = sess.run(names, {"image": x})
    got_single = [np.concatenate(parts) for parts in
                  zip(*(sess.run(names, {"image": x[i : i + 1]}) for i in range(len(x))), strict=True)]
    worst = float(max(np.abs(r - g).max() for r, g in zip(ref * 2, got_batch + got_single, strict=True)))
    if not np.isfinite(worst) or worst > atol:
        raise ExportParityError(
            f"ONNX Runtime disagrees with torch: max |difference| over {', '.join(names)} {worst:.3g} > tolerance {atol:g} "
            f"on {len(x)} preprocessed images"
        )
    log.info("parity ok: max |difference| %.2e over %s on %d images (tolerance %g)", worst, ", ".join(names), len(x), atol)
    return worst


def export_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike, run_dir: str | os.PathLike,
                atol: float = 2e-2) -> ArtifactMetadata:
    """An fp16 copy of an fp32 artifact for GPU execution providers (CUDA, TensorRT): weights and compute in
    float16, inputs and outputs kept float32 so callers and the service do not change. Parity with the fp32
    artifact is checked on real validation images (ONNX Runtime, CPU); the file is removed above ``atol``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, out = Path(fp32_path), Path(out_path)
    meta = read_artifact(src)
    half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    meta = meta.model_copy(update={"quantization": QuantizationReport(
        format="fp16", reason="float16 weights and compute for GPU execution providers; float32 inputs and outputs",
        source=str(src.resolve()), source_sha256=sha256_file(src))})
    write_artifact(half, meta, out)
    cfg, _, _ = read_run(Path(run_dir))
    x = parity_inputs(cfg, Path(run_dir))
    ref, got = session(src), session(out)
    names = [o.name for o in ref.get_outputs()]
    worst = float(max(np.abs(a - b).max() for a, b in zip(ref.run(names, {"image": x}), got.run(names, {"image": x}),
                                                           strict=True)))
    if not np.isfinite(worst) or worst > atol:
        out.unlink(missing_ok=True)
        raise ExportParityError(f"the fp16 model disagrees with fp32: max |difference| {worst:.3g} > tolerance {atol:g}")
    log.info("fp16 parity ok: max |difference| %.2e (tolerance %g)", worst, atol)
    return meta
