"""``medvision train`` and ``medvision export``. torch is imported only when a command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvision.extras import require_extra

TRAIN_MODULES = ("torch", "timm", "albumentations", "safetensors", "onnx")

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
    p.set_defaults(func=run_export)


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
    summary = {k: metrics[k] for k in ("model", "best_epoch", "val_auroc", "threshold", "val_sensitivity",
                                       "val_specificity", "train_seconds")}
    print(json.dumps(summary, indent=2))
    return 0


def run_export(args: argparse.Namespace) -> int:
    require_extra("train", *TRAIN_MODULES)
    from medvision.training.export import export_run

    meta = export_run(args.run, args.out, atol=args.atol)
    print(json.dumps({"artifact": args.out, "model": meta.model_name, "threshold": meta.threshold,
                      "weights_sha256": meta.weights_sha256}, indent=2))
    return 0
