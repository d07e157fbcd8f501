"""Fine-tune a registered ViT on a labels CSV + DICOM folder; keep the best checkpoint by validation AUROC.

Outputs in ``out_dir``: ``best.safetensors`` (weights; the resolved config in its metadata),
``config.yaml``, ``split.csv``, ``metrics.json`` and ``train.log``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, WeightedRandomSampler

from medvision import __version__
from medvision.config import RunConfig, save_config
from medvision.data import check_split, load_rows, patient_split, read_split, write_split
from medvision.errors import ConfigError
from medvision.metrics import auroc, sensitivity_specificity, threshold_for_sensitivity
from medvision.preprocess import Preprocess
from medvision.progress import progress_bar
from medvision.training.augment import build_augment
from medvision.training.dataset import CachedImages, decode_all
from medvision.training.models import create_model

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # No decay on biases, norms and embeddings (standard for ViT fine-tuning).
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


@torch.no_grad()
def predict_probs(model: torch.nn.Module, ds: CachedImages, batch_size: int) -> np.ndarray:
    model.eval()
    out = []
    for x, _ in DataLoader(ds, batch_size=batch_size, shuffle=False):
        out.append(torch.sigmoid(model(x)).squeeze(1).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train(cfg: RunConfig, out_dir: str | os.PathLike, show_progress: bool = True) -> dict:
    """Run training as configured; returns the metrics dict also written to ``metrics.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(cfg.data.labels_csv, cfg.data.image_dir, cfg.data.manifest)
    save_config(cfg, out / "config.yaml")
    seed_everything(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    if cfg.data.split_file:
        assignment = read_split(cfg.data.split_file)
    else:
        assignment = patient_split(rows, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    check_split(rows, assignment)
    write_split(out / "split.csv", rows, assignment)
    by_split = {s: [r for r in rows if assignment[r.patient_id] == s] for s in ("train", "val")}
    for s, rs in by_split.items():
        if len({r.label for r in rs}) < 2:
            raise ConfigError(f"the {s} split needs both classes; it has {len(rs)} image(s) of one class")

    pre = Preprocess(cfg.preprocess)
    cache = {"cache_dir": cfg.data.cache_dir, "use_cache": cfg.data.cache, "workers": cfg.data.decode_workers}
    train_imgs, train_rows = decode_all(by_split["train"], pre, "decode train", show_progress, **cache)
    val_imgs, val_rows = decode_all(by_split["val"], pre, "decode val", show_progress, **cache)
    y_train = np.array([r.label for r in train_rows])
    y_val = np.array([r.label for r in val_rows])
    train_ds = CachedImages(train_imgs, y_train, pre, build_augment(cfg.train.augment, cfg.train.seed))
    val_ds = CachedImages(val_imgs, y_val, pre)

    g = torch.Generator().manual_seed(cfg.train.seed)
    if cfg.train.balanced_sampling:
        counts = np.bincount(y_train, minlength=2).astype(float)
        weights = torch.as_tensor(1.0 / counts[y_train], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(y_train), replacement=True, generator=g)
        loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler,
                            num_workers=cfg.train.num_workers, drop_last=len(y_train) > cfg.train.batch_size)
    else:
        loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True, generator=g,
                            num_workers=cfg.train.num_workers, drop_last=len(y_train) > cfg.train.batch_size)

    model = create_model(cfg.model, cfg.preprocess.image_size)
    n_params = sum(p.numel() for p in model.parameters())
    optim = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    steps_per_epoch = max(len(loader), 1)
    total = steps_per_epoch * cfg.train.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, _lr_lambda(int(cfg.train.warmup_epochs * steps_per_epoch), total)
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()

    history, best = [], {"val_auroc": -1.0, "epoch": -1}
    started = time.monotonic()
    log.info("training %s (%.1f M parameters) on %d images, validating on %d", cfg.model.name, n_params / 1e6,
             len(train_ds), len(val_ds))
    for epoch in range(cfg.train.epochs):
        model.train()
        running, seen = 0.0, 0
        with progress_bar(f"epoch {epoch + 1}/{cfg.train.epochs}", total=steps_per_epoch, enabled=show_progress) as advance:
            for x, y in loader:
                loss = loss_fn(model(x), y)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optim.step()
                sched.step()
                running += loss.item() * len(x)
                seen += len(x)
                advance(status=f"loss {running / seen:.4f}")
        probs = predict_probs(model, val_ds, cfg.train.batch_size)
        val_auc = auroc(y_val, probs)
        eps = 1e-7
        val_loss = float(-np.mean(y_val * np.log(probs + eps) + (1 - y_val) * np.log(1 - probs + eps)))
        record = {"epoch": epoch + 1, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                  "val_auroc": val_auc, "lr": sched.get_last_lr()[0], "elapsed_s": time.monotonic() - started}
        history.append(record)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f", epoch + 1, record["train_loss"],
                 val_loss, val_auc)
        if val_auc > best["val_auroc"] or best["epoch"] < 0:
            best = {"val_auroc": val_auc, "epoch": epoch + 1}
            _save_checkpoint(model, cfg, out / "best.safetensors", epoch + 1, val_auc)
        if cfg.train.max_minutes and (time.monotonic() - started) / 60 > cfg.train.max_minutes:
            log.warning("stopping after epoch %d: train.max_minutes=%s reached", epoch + 1, cfg.train.max_minutes)
            break

    # Operating point from the best checkpoint's validation scores.
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(out / "best.safetensors")))
    probs = predict_probs(model, val_ds, cfg.train.batch_size)
    threshold = threshold_for_sensitivity(y_val, probs, cfg.train.target_sensitivity)
    sens, spec = sensitivity_specificity(y_val, probs, threshold)
    metrics = {
        "model": cfg.model.name, "parameters": n_params, "medvision_version": __version__,
        "images": {"train": len(train_ds), "val": len(val_ds)},
        "best_epoch": best["epoch"], "val_auroc": auroc(y_val, probs),
        "threshold": threshold, "operating_point": f"sensitivity >= {cfg.train.target_sensitivity:.2f} on validation",
        "val_sensitivity": sens, "val_specificity": spec,
        "pretrained": cfg.model.pretrained or "none (random initialisation)",
        "history": history, "train_seconds": time.monotonic() - started,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _save_checkpoint(model: torch.nn.Module, cfg: RunConfig, path: Path, epoch: int, val_auroc: float) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={
        "config": cfg.model_dump_json(), "epoch": str(epoch), "val_auroc": f"{val_auroc:.6f}",
        "medvision_version": __version__,
    })
