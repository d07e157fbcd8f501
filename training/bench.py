"""``medvision bench``: teacher vs student, torch vs ONNX Runtime, fp32 vs INT8, side by side in one run.

Every subject runs in its own process (``bench_worker``) with the same thread count, the same
batch sizes and the same seeded inputs at its own input size, so images/s, latency p50 / p99 and
peak memory are comparable; ratios are to the first teacher. The machine's measured fp32 matmul
GFLOP/s is printed for context. Subjects are run folders (torch), registered model names (torch,
random weights: speed does not depend on training) or ONNX files (ONNX Runtime); given student
names or runs but no ONNX, the bench exports each and quantizes it itself the way ``medvision quantize``
would win on it: dynamic INT8 for a ViT (its MatMuls), static QDQ for a CNN (dynamic INT8 leaves Conv in
float).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvision.cores import usable_cores
from medvision.errors import ArtifactError, ConfigError
from medvision.plots import pyplot

log = logging.getLogger(__name__)


@dataclass
class Subject:
    label: str
    kind: str  # "torch" or "ort"
    source: str
    image_size: int
    role: str  # "teacher" or "student"
    size_mb: float = float("nan")
    spec: dict = field(default_factory=dict)


def named_size(source: str) -> tuple[str, int | None]:
    """``"vit_tiny_patch16_224@192"`` -> ``("vit_tiny_patch16_224", 192)``: a registered model at another input size
    (a ViT then has fewer or more patch tokens); a plain name -> ``(name, None)``."""
    name, at, size = source.partition("@")
    if not at:
        return source, None
    if not size.isdigit() or not 16 <= int(size) <= 4096:
        raise ConfigError(f"'{source}': the input size after '@' must be a whole number of pixels (16-4096)")
    return name, int(size)


def build_torch_model(source: str, image_size: int):
    """A run folder's best checkpoint, or a registered architecture (``NAME`` or ``NAME@SIZE``) with random weights."""
    path = Path(source)
    if path.is_dir():
        from medvision.training.export import load_run

        return load_run(path)[1]
    from medvision.config import ModelConfig
    from medvision.training.models import create_model

    return create_model(ModelConfig(name=named_size(source)[0], drop_path_rate=0.0), image_size,
                        weights_follow=True)  # speed only: the weights do not change it


def _torch_subject(source: str, role: str) -> Subject:
    """A run folder (its checkpoint's size) or a registered name, ``@SIZE`` for another input size than the
    registered one (its model size comes from the worker's parameter count)."""
    path = Path(source)
    if path.is_dir():
        from medvision.training.export import read_run

        cfg, _, ckpt = read_run(path)
        return Subject(f"{role} {cfg.model.name} (torch fp32)", "torch", str(path.resolve()),
                       cfg.preprocess.image_size, role, ckpt.stat().st_size / 1e6)
    from medvision.registry import get_model_spec

    name, size = named_size(source)
    return Subject(f"{role} {source} (torch fp32)", "torch", source, size or get_model_spec(name).image_size, role)


def _ort_subject(path: str | Path, label: str) -> Subject:
    from medvision.artifact import read_artifact

    meta = read_artifact(path)
    return Subject(f"{label} {meta.model_name} (ORT {meta.format})", "ort", str(Path(path).resolve()),
                   meta.preprocess.image_size, "student", Path(path).stat().st_size / 1e6)


def _export_student(source: str, work: Path) -> tuple[Path, Path]:
    """fp32 ONNX (with medvision metadata) and its INT8 copy, for a student given without artifacts.

    A token-pooled ViT is quantized dynamically (``DYNAMIC_OPS``, attention fused); anything else (a CNN) by
    static QDQ as ``medvision quantize`` builds it (per-channel, the first convolution in float), calibrated
    on eight of the bench's seeded inputs: the ranges then fit random images, not mammograms, which changes
    no kernel and so no timing (the real calibration is ``quantize``'s, on training images).
    """
    import datetime as _dt

    import onnx
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    from medvision import __version__
    from medvision.artifact import (
        ArtifactMetadata,
        InputContract,
        OperatingPoint,
        QuantizationReport,
        write_artifact,
    )
    from medvision.preprocess import PreprocessConfig
    from medvision.registry import get_model_spec
    from medvision.training.export import _simplify, _WithProbability, trace_onnx
    from medvision.training.quantize import DYNAMIC_OPS, _quiet_root_logger, _Reader, sensitive_nodes

    subject = _torch_subject(source, "student")
    model = build_torch_model(source, subject.image_size).eval()
    name = Path(source).name if Path(source).is_dir() else source
    stem = name.replace("@", "_")
    fp32, int8, pre = work / f"{stem}_fp32.onnx", work / f"{stem}_int8.onnx", work / f"{stem}_pre.onnx"
    size = subject.image_size
    _, fused = trace_onnx(_WithProbability(model).eval(), fp32, size)
    proto = _simplify(onnx.load(str(fp32)))
    meta = ArtifactMetadata(model_name=name, architecture=name if Path(source).is_dir()
                            else get_model_spec(named_size(name)[0]).timm_name, medvision_version=__version__,
                            created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                            preprocess=PreprocessConfig(image_size=size), input=InputContract(shape=["batch", 1, size, size]),
                            operating_points=[OperatingPoint(rule="threshold 0.5 (benchmark export)", threshold=0.5)],
                            weights_sha256="bench-export", runtime_ops=["com.microsoft.Attention"] if fused else [])
    write_artifact(proto, meta, fp32)
    vit = hasattr(model, "token_logits")
    with _quiet_root_logger():
        quant_pre_process(str(fp32), str(pre))
        if vit:
            quantize_dynamic(pre, int8, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=DYNAMIC_OPS)
        else:
            from medvision.training.bench_worker import seeded_inputs

            in_float = sensitive_nodes(onnx.load(str(pre)))
            quantize_static(pre, int8, _Reader(seeded_inputs(size, 8), meta.input.name), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                            nodes_to_exclude=in_float["first_conv"] + in_float["activation_matmuls"])
    fmt = "dynamic_s8" if vit else "static_qdq"
    write_artifact(onnx.load(str(int8)), meta.model_copy(update={"quantization": QuantizationReport(format=fmt)}), int8)
    return fp32, int8


def _run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        done = subprocess.run([sys.executable, "-m", "medvision.training.bench_worker"], input=json.dumps(spec),
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"took longer than {timeout:.0f} s"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"worker exited {done.returncode}: {tail[0][:300]}"}
    return json.loads(done.stdout)


def _median_round(runs: list[dict]) -> dict:
    """One subject's rounds -> per batch size the round with the median images/s (its latencies with it), the
    highest peak memory, and every round's images/s."""
    ok = [r for r in runs if "results" in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    out["results"] = {}
    for bs in ok[0]["results"]:
        ordered = sorted((r["results"][bs] for r in ok), key=lambda m: m["images_per_s"])
        out["results"][bs] = {**ordered[len(ordered) // 2], "rounds": [m["images_per_s"] for m in ordered]}
    for key in ("peak_rss_mb", "baseline_rss_mb"):
        if key in out:
            out[key] = max(r[key] for r in ok)
    return out


def bench(teachers: list[str], student: str | list[str] | None = None, onnx_fp32: str | None = None,
          onnx_int8: str | None = None,
          batch_sizes: tuple[int, ...] = (1, 8, 32), threads: int = 0, seconds: float = 3.0, min_runs: int = 3,
          device: str = "cpu", timeout: float = 900.0, show_progress: bool = True, rounds: int = 1) -> dict:
    """``rounds`` > 1 measures every subject that many times, interleaved (the order rotates each round), and
    keeps each subject's median round per batch size: drift in the machine's load then hits all subjects
    alike instead of whichever happened to run during it."""
    if not teachers:
        raise ConfigError("give at least one --teacher (a run folder or a registered model name)")
    students = [student] if isinstance(student, str) else list(student or [])
    if not (students or onnx_fp32 or onnx_int8):
        raise ConfigError("give a --student (run folder or model name) and / or its --onnx / --int8 artifacts")
    if len(students) > 1 and (onnx_fp32 or onnx_int8):
        raise ConfigError("--onnx / --int8 belong to one student: with several --student the bench exports each")
    threads = threads or usable_cores()
    work = Path(tempfile.mkdtemp(prefix="mv-bench-"))
    try:
        subjects = [_torch_subject(t, "teacher") for t in teachers]
        for name in students:
            subjects.append(_torch_subject(name, "student"))
            if not (onnx_fp32 or onnx_int8):
                subjects += [_ort_subject(p, "student") for p in _export_student(name, work)]
        if onnx_fp32:
            subjects.append(_ort_subject(onnx_fp32, "student"))
        if onnx_int8:
            subjects.append(_ort_subject(onnx_int8, "student"))
        for s in subjects:
            if s.kind == "ort" and not Path(s.source).is_file():
                raise ArtifactError(f"no ONNX file at {s.source}")
        common = {"threads": threads, "batch_sizes": list(batch_sizes), "seconds": seconds, "min_runs": min_runs,
                  "device": device}
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None)
        from medvision.progress import progress_bar

        if rounds < 1:
            raise ConfigError("--rounds must be >= 1")
        measured: list[list[dict]] = [[] for _ in subjects]
        with progress_bar("bench", len(subjects) * rounds + 1, show_progress) as advance:
            matmul = _run_worker({"kind": "matmul", **common}, timeout)
            advance(1)
            for rnd in range(rounds):
                for i in [(j + rnd) % len(subjects) for j in range(len(subjects))]:
                    s = subjects[i]
                    spec = {"kind": s.kind, "source": s.source, "image_size": s.image_size, **common,
                            "precision": "bf16" if device == "cuda" and s.kind == "torch" else "fp32",
                            "providers": providers}
                    advance(0, status=f"{s.label}" + (f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""))
                    measured[i].append(_run_worker(spec, timeout))
                    advance(1)
        rows = []
        for s, runs in zip(subjects, measured, strict=True):
            r = _median_round(runs)
            size = s.size_mb if s.size_mb == s.size_mb else r.get("parameters", float("nan")) * 4 / 1e6  # fp32
            rows.append({"label": s.label, "kind": s.kind, "role": s.role, "image_size": s.image_size,
                         "size_mb": size, **r})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = rows[0].get("results", {})
    for row in rows:
        for bs, m in row.get("results", {}).items():
            base = ref.get(bs, {}).get("images_per_s")
            m["vs_teacher"] = m["images_per_s"] / base if base else float("nan")
    import platform

    return {"threads": threads, "batch_sizes": list(batch_sizes), "device": device, "matmul": matmul, "rounds": rounds,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "inputs": "seeded standard-normal images at each model's input size (speed does not depend on content)",
            "subjects": rows}


def table_markdown(report: dict) -> str:
    bss = [str(b) for b in report["batch_sizes"]]
    head = ["model", "input", "size MB", "peak RSS MB (+ over runtime)"]
    for bs in bss:
        head += [f"img/s b{bs}", f"p50 / p99 ms b{bs}", f"× teacher b{bs}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["subjects"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['image_size']} | {r['size_mb']:.1f} | error: {r['error']} |")
            continue
        label = r["label"]
        if report["device"] == "cuda" and r["kind"] == "ort" and "CUDAExecutionProvider" not in r.get("providers", []):
            label += " — on the CPU: no CUDA execution provider (pip install 'medvision-radiology[gpu]')"
        cells = [label, str(r["image_size"]), f"{r['size_mb']:.1f}",
                 f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f})"]
        for bs in bss:
            m = r["results"][bs]
            cells += [f"{m['images_per_s']:.1f}", f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f}", f"{m['vs_teacher']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    teachers = [r for r in report["subjects"] if r["role"] == "teacher" and "results" in r]
    students = [r for r in report["subjects"] if r["role"] == "student" and "results" in r]
    if teachers and students:
        lines.append("")
    for t in teachers:
        for s in students:
            ratios = ", ".join(f"{s['results'][b]['images_per_s'] / t['results'][b]['images_per_s']:.1f}× at batch {b}"
                               for b in bss)
            lines.append(f"- {s['label']} vs {t['label']}: {ratios}")
    mm = report["matmul"]
    gf = ", ".join(f"{k.replace('_gflops', '')} {v:.0f} GFLOP/s" for k, v in mm.items() if k.endswith("gflops"))
    lines += ["", f"{report['threads']} threads on {report['device']}; measured matmul: {gf or mm.get('error', '?')}. "
              f"Inputs: {report['inputs']}. Ratios are to the first row at the same batch size."
              + (f" Each cell: the median of {report['rounds']} interleaved rounds." if report.get("rounds", 1) > 1 else "")]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    rows = [r for r in report["subjects"] if "results" in r]
    bss = [str(b) for b in report["batch_sizes"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(bss)) + i * width, [r["results"][b]["images_per_s"] for b in bss], width, label=r["label"])
    ax.set_xticks(np.arange(len(bss)) + width * (len(rows) - 1) / 2, [f"batch {b}" for b in bss])
    ax.set_ylabel("images / s")
    ax.set_yscale("log")
    ax.set_title(f"Inference throughput, {report['threads']} threads ({report['device']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
