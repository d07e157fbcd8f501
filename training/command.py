"""``medvision train`` and ``medvision export``. torch is imported only when a command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvision.extras import require_extra
from medvision.training.criteria import DEFAULT, GateCriteria

TRAIN_MODULES = ("torch", "timm", "albumentations", "safetensors", "onnx", "onnxruntime")

CONFIG_DIR = Path(__file__).parent / "configs"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a ViT on a manifest (or an RSNA labels CSV + DICOM folder)",
        description="Patient-level split, augmentation, AUROC on validation every epoch; writes "
        "best.safetensors, config.yaml, split.csv and metrics.json to --out. Config: YAML (--config, or a "
        f"recipe name from {CONFIG_DIR.name}/) plus 'section.key=value' overrides.",
    )
    p.add_argument("--config", help="YAML file or recipe name (e.g. 'demo', 'tiny', 'vit_small')")
    p.add_argument("--manifest", help="manifest CSV from 'medvision data manifest' (sets data.manifest)")
    p.add_argument("--split", help="reuse this split CSV from 'medvision data split' (sets data.split_file)")
    p.add_argument("--labels", help="RSNA labels CSV (sets data.labels_csv)")
    p.add_argument("--images", help="image folder (sets data.image_dir)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from RUN/last.pt with its own "
                   "config.yaml (overrides may only change train.max_minutes / train.early_stopping)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="e.g. train.epochs=3 model.name=vit_tiny_patch16_224")
    p.set_defaults(func=run_train)


def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a trained run to ONNX with embedded metadata",
        description="Writes ONNX (opset 17, dynamic batch) with preprocessing, labels, threshold and weights "
        "hash embedded, then checks torch vs ONNX Runtime on real validation images.",
    )
    p.add_argument("run", help="run folder written by 'medvision train'")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--atol", type=float, default=1e-4, help="max |logit| difference torch vs ONNX Runtime")
    p.add_argument("--fp16", metavar="OUT16", help="also write an fp16 copy for GPU execution providers (CUDA, "
                   "TensorRT; float32 inputs and outputs), parity-checked against the fp32 file")
    p.add_argument("--portable", action="store_true", help="standard ONNX operators only: attention is not exported "
                   "as ONNX Runtime's fused com.microsoft.Attention (slower, but runs on any ONNX runtime)")
    p.set_defaults(func=run_export)


def register_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="train a small student from a teacher run's logits (knowledge distillation)",
        description="Trains the student recipe on the teacher's data and split (so the teacher's validation "
        "and test patients stay unseen), with soft (tempered) or hard teacher targets; the teacher's logits are "
        "computed once and cached in the run. With --baseline the same student is also trained without a "
        "teacher, and RUN/distill_report.md compares them on the held-out split (paired bootstrap).",
    )
    p.add_argument("--teacher", required=True, help="teacher run folder written by 'medvision train'")
    p.add_argument("--config", default="student_vit_tiny", help="student recipe or YAML (default student_vit_tiny)")
    p.add_argument("--out", required=True, help="student run folder")
    p.add_argument("--mode", choices=["soft", "hard"], default="soft")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--baseline", action="store_true", help="also train the student without a teacher and compare")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="e.g. train.epochs=10")
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    from medvision.config import load_config
    from medvision.errors import ConfigError
    from medvision.training.distill import write_comparison
    from medvision.training.evaluate import compare_runs
    from medvision.training.export import read_run
    from medvision.training.train import train

    teacher = Path(args.teacher)
    tcfg, _, _ = read_run(teacher)
    if not (teacher / "split.csv").is_file():
        raise ConfigError(f"{teacher} has no split.csv: distill from a run written by 'medvision train'")
    data = [f"data.{k}={v}" for k, v in tcfg.data.model_dump().items() if v is not None and k != "split_file"]
    overrides = [*data, f"data.split_file={teacher / 'split.csv'}", f"distill.teacher={teacher}",
                 f"distill.mode={args.mode}", f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}",
                 *args.overrides]
    cfg = load_config(resolve_config_path(args.config), overrides)
    out = Path(args.out)
    metrics = train(cfg, out, show_progress=not args.no_progress)
    if args.baseline and metrics:
        base_cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": None})})
        train(base_cfg, out / "baseline", show_progress=not args.no_progress)
        report = compare_runs({"student without teacher": out / "baseline", "distilled student": out,
                               "teacher": teacher}, n_boot=args.bootstrap, show_progress=not args.no_progress)
        write_comparison(report, out / "distill_report")
        print(json.dumps(report, indent=2))
        return 0
    return _print_summary(metrics)


def register_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="INT8 candidates measured on this CPU; ships the fastest that keeps its decisions",
        description="Dynamic INT8 (S8, and U8 with reduce_range for CPUs without VNNI) and static QDQ calibrated "
        "on training images (MinMax, Percentile; per channel; first convolution kept in float), each timed "
        "against the fp32 artifact here and compared on the held-out split. Writes the chosen model (fp32 if "
        "no INT8 candidate is faster and within 99 %% decision agreement / 0.01 AUROC) and OUT.quantize.json.",
    )
    p.add_argument("artifact", help="fp32 ONNX artifact from 'medvision export'")
    p.add_argument("--run", required=True, help="the run it was exported from (calibration and test images)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--entropy-bins", type=int, default=1024,
                   help="histogram bins for entropy calibration (>= 256; its search time grows with the square)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per candidate (batch 1, median)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = one per physical core this process may use)")
    p.add_argument("--teacher", help="then run the promotion gate against this teacher run (as 'medvision gate'): "
                   "--out is written only if the gate passes")
    p.add_argument("--bootstrap", type=int, default=2000, help="gate bootstrap resamples (with --teacher)")
    _gate_criteria_arguments(p, " (with --teacher)")
    p.add_argument("--no-progress", action="store_true")
    # quantize keeps only candidates agreeing with fp32 on quantize.MIN_AGREEMENT: the gate's limit is the same
    p.set_defaults(func=run_quantize, min_agreement=DEFAULT.min_agreement)


def run_quantize(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    import shutil
    import tempfile

    from medvision.training.gate import gate_artifact
    from medvision.training.quantize import quantize_artifact

    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="mv-gate-")) if args.teacher else None
    target = work / out.name if work else out
    try:
        r = quantize_artifact(args.artifact, args.run, target, args.calibration_images, args.runs, args.threads,
                              show_progress=not args.no_progress, entropy_bins=args.entropy_bins)
        print(json.dumps({"chosen": r["chosen"], "reason": r["reason"], "fp32_latency_ms": r["fp32"]["latency_ms"],
                          "candidates": {k: {m: v.get(m) for m in ("speedup", "agreement", "auroc_drop", "passes",
                                                                    "error") if m in v}
                                         for k, v in r["candidates"].items()}}, indent=2))
        if not work:
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(target.with_suffix(".quantize.json")), out.with_suffix(".quantize.json"))
        report = gate_artifact(target, args.teacher, out, args.artifact, _criteria(args), args.bootstrap,
                               args.threads, show_progress=not args.no_progress)
        return _gate_exit(report, str(out))
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)


def register_gate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gate", help="promote a student artifact only if it keeps its teacher's clinical accuracy",
        description="On the teacher's held-out test split, paired patient-clustered bootstrap of the student "
        "artifact against the teacher: AUROC drop <= 0.01, sensitivity drop at the stored operating points <= 2 "
        "points, (for a quantized artifact) >= 99 %% of decisions agreeing with its fp32 source, and (for an artifact "
        "that decodes fewer pixels than the file holds) the same artifact decoding every pixel: AUROC drop <= 0.005 "
        "and >= 99 %% of decisions agreeing. A passing "
        "model is written to --out with the result in its metadata; a failing one is not written and the command "
        "exits 3. Always writes OUT.gate.json and the model card OUT.card.md.",
    )
    p.add_argument("artifact", help="student ONNX artifact (from 'medvision export' or 'medvision quantize')")
    p.add_argument("--teacher", required=True, help="the teacher's run folder (its test split is the judge)")
    p.add_argument("--out", required=True, help="where to write the promoted model")
    p.add_argument("--fp32", help="the fp32 export a quantized artifact came from (default: recorded by quantize)")
    _gate_criteria_arguments(p)
    p.add_argument("--min-agreement", type=float, default=DEFAULT.min_agreement,
                   help="share of a quantized artifact's decisions that must agree with its fp32 source")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = one per physical core this process may use)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_gate)


def _gate_criteria_arguments(p: argparse.ArgumentParser, suffix: str = "") -> None:
    """The gate's limits as options, for 'medvision gate' and 'medvision quantize --teacher' alike."""
    p.add_argument("--max-auroc-drop", type=float, default=DEFAULT.max_auroc_drop,
                   help="AUROC the student may lose against its teacher" + suffix)
    p.add_argument("--max-sensitivity-drop", type=float, default=DEFAULT.max_sensitivity_drop,
                   help="sensitivity the student may lose at the operating points" + suffix)
    p.add_argument("--max-contract-auroc-drop", type=float, default=DEFAULT.max_contract_auroc_drop,
                   help="AUROC the artifact may lose to its decode contract against decoding every pixel" + suffix)
    p.add_argument("--min-contract-agreement", type=float, default=DEFAULT.min_contract_agreement,
                   help="share of decisions that must be the same under the decode contract and a full decode"
                   + suffix)
    p.add_argument("--non-inferiority", action="store_true",
                   help="decide on the upper 95 %% bounds of the drops instead of their point estimates" + suffix)


def _criteria(args: argparse.Namespace):
    return GateCriteria(args.max_auroc_drop, args.max_sensitivity_drop, args.min_agreement, args.non_inferiority,
                        max_contract_auroc_drop=args.max_contract_auroc_drop,
                        min_contract_agreement=args.min_contract_agreement)


def _gate_exit(report, out: str) -> int:
    from medvision.training.gate import GATE_FAILED_EXIT, gate_summary

    print(gate_summary(report))
    card = Path(out).with_suffix(".card.md")
    if report.passed:
        print(f"\npromoted: {out} (model card {card})")
        return 0
    print(f"\nnot promoted: {'; '.join(report.reasons)} (model card {card})")
    return GATE_FAILED_EXIT


def run_gate(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    from medvision.training.gate import gate_artifact

    report = gate_artifact(args.artifact, args.teacher, args.out, args.fp32, _criteria(args), args.bootstrap,
                           args.threads, show_progress=not args.no_progress)
    return _gate_exit(report, args.out)


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="teacher vs student, torch vs ONNX Runtime, fp32 vs INT8: throughput, latency, memory",
        description="Each model in its own process with the same threads, batch sizes and inputs: images/s, "
        "latency p50 / p99, peak memory and model size, with ratios to the (first) teacher and the measured fp32 "
        "matmul GFLOP/s. Teachers and students are run folders or registered model names (random weights); "
        "ONNX files run on ONNX Runtime. A student without --onnx / --int8 is exported and quantized by the "
        "bench itself (dynamic INT8 for a ViT, static QDQ for a CNN); --student may be repeated to compare "
        "students.",
    )
    p.add_argument("--teacher", action="append", default=[], help="run folder or model name (repeatable)")
    p.add_argument("--student", action="append", default=[],
                   help="student run folder or model name (torch fp32 row; repeatable)")
    p.add_argument("--onnx", help="the (one) student's fp32 ONNX artifact")
    p.add_argument("--int8", help="the (one) student's quantized (or promoted) ONNX artifact")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", type=int, default=0, help="threads for every model (0 = every core this process may use)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model and batch size (at least 3 runs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: torch in bf16 and ONNX Runtime's CUDA execution provider")
    p.add_argument("--rounds", type=int, default=1, help="measure every model this many times, interleaved, and keep "
                   "the median (steadier ratios on a shared machine)")
    p.add_argument("--out", help="folder for bench.json, bench.md and bench.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    from medvision.errors import ConfigError
    from medvision.training.bench import bench, plot, table_markdown

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, not {args.batch_sizes!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError("--batch-sizes needs at least one positive batch size")
    report = bench(args.teacher, args.student, args.onnx, args.int8, sizes, args.threads, args.seconds,
                   device=args.device, show_progress=not args.no_progress, rounds=args.rounds)
    table = table_markdown(report)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2))
        (out / "bench.md").write_text(table + "\n")
        plot(report, out / "bench.png")
    return 1 if any("error" in r for r in report["subjects"]) else 0


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="clinical report of a trained run; fits calibration and operating points for export",
        description="On validation: temperature scaling and operating points by rule (written to "
        "RUN/calibration.json, embedded by 'medvision export'). On the held-out split: AUROC and PR-AUC with "
        "patient-clustered bootstrap 95 %% CIs, sensitivity / specificity at the operating points and at fixed "
        "specificities / sensitivities, confusion matrix, calibration (ECE, reliability diagram), subgroups, "
        "image and breast level. Writes report.md, report.json, roc.png, reliability.png.",
    )
    p.add_argument("run", help="run folder written by 'medvision train'")
    p.add_argument("--out", help="report folder (default RUN/evaluation)")
    p.add_argument("--subset", default="test", choices=["test", "val", "train"], help="split to report on")
    p.add_argument("--rule", action="append", dest="rules", metavar="RULE",
                   help="operating point rule, e.g. 'sensitivity>=0.90' or 'specificity>=0.95' (repeatable; the "
                   "first is the primary; default: the run's train.target_sensitivity)")
    p.add_argument("--subgroups", default=",".join(("manufacturer", "view", "laterality", "density", "age_band")),
                   help="comma-separated: manufacturer, view, laterality, density, age_band, site")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--breast-aggregate", choices=["mean", "max"], default="mean")
    p.add_argument("--lesions", help="lesions.csv (from 'medvision synth') for the heatmap pointing game "
                   "(default: found next to the labels / manifest)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    from medvision.training.evaluate import evaluate_run

    r = evaluate_run(args.run, args.out, args.subset, tuple(args.rules) if args.rules else None,
                     tuple(g.strip() for g in args.subgroups.split(",") if g.strip()), args.bootstrap,
                     args.breast_aggregate, show_progress=not args.no_progress, lesions_csv=args.lesions)
    m = r["image_level"]
    print(json.dumps({"subset": r["subset"], "images": m["n"], "auroc": m["auroc"], "auroc_ci95": m["auroc_ci95"],
                      "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                      "calibration": {k: r["calibration"][k] for k in ("method", "temperature", "bias")},
                      "ece": m["calibration"]["ece"], "ece_ci95": m["ece_ci95"],
                      "report": str(Path(args.out or Path(args.run) / "evaluation") / "report.md")}, indent=2))
    return 0


def resolve_config_path(name: str | None) -> str | None:
    if name is None or Path(name).is_file():
        return name
    recipe = CONFIG_DIR / f"{name}.yaml"
    if recipe.is_file():
        return str(recipe)
    from medvision.errors import ConfigError

    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{name}' is neither a file nor a recipe ({known})")


def run_train(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    from medvision.config import load_config
    from medvision.training.train import train

    overrides = list(args.overrides)
    if args.resume:
        from medvision.errors import ConfigError

        if args.config or args.manifest or args.labels or args.images or args.split:
            raise ConfigError("--resume uses the run's own config.yaml: do not combine it with --config or data options")
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"cannot resume: {run_dir / 'config.yaml'} not found")
        cfg = load_config(run_dir / "config.yaml", overrides)
        metrics = train(cfg, run_dir, show_progress=not args.no_progress, resume=True)
        return _print_summary(metrics)
    if not args.out:
        from medvision.errors import ConfigError

        raise ConfigError("give --out RUN (a new run folder) or --resume RUN")
    if args.manifest:
        overrides.append(f"data.manifest={args.manifest}")
    if args.split:
        overrides.append(f"data.split_file={args.split}")
    if args.labels:
        overrides.append(f"data.labels_csv={args.labels}")
    if args.images:
        overrides.append(f"data.image_dir={args.images}")
    cfg = load_config(resolve_config_path(args.config), overrides)
    metrics = train(cfg, args.out, show_progress=not args.no_progress)
    return _print_summary(metrics)


def _print_summary(metrics: dict) -> int:
    if not metrics:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    summary = {k: metrics[k] for k in ("model", "best_epoch", "val_auroc", "threshold", "val_sensitivity",
                                       "val_specificity", "train_seconds")}
    print(json.dumps(summary, indent=2))
    return 0


def run_export(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    from medvision.training.export import export_run

    meta = export_run(args.run, args.out, atol=args.atol, portable=args.portable)
    if args.fp16:
        from medvision.training.export import export_fp16

        export_fp16(args.out, args.fp16, args.run)
    print(json.dumps({"artifact": args.out, "model": meta.model_name, "threshold": meta.threshold,
                      "weights_sha256": meta.weights_sha256, **({"fp16": args.fp16} if args.fp16 else {})}, indent=2))
    return 0
