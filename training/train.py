"""Fine-tune a registered model on a manifest (or RSNA labels); keep the best checkpoint by validation AUROC.

Outputs in ``out_dir``: ``best.safetensors`` (weights; the resolved config in its metadata),
``last.pt`` (everything needed to resume exactly: weights, EMA, optimizer, schedule, RNG states),
``config.yaml``, ``split.csv``, ``metrics.json``, ``curves.png`` and ``tensorboard/``.

Resuming (``resume=True`` / ``medvision train --resume RUN``) continues from the last completed epoch
and gives the same weights, bit for bit, as a run that was never interrupted: augmentation is seeded
per (seed, epoch, sample), the sampler's generator and every RNG state are restored, and the learning
rate schedule continues from its step count.
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
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, WeightedRandomSampler

from medvision import __version__
from medvision.config import RunConfig, save_config
from medvision.data import check_split, load_rows, patient_split, read_split, write_split
from medvision.errors import ConfigError
from medvision.metrics import auroc, sensitivity_specificity, threshold_for_sensitivity
from medvision.plots import pyplot
from medvision.preprocess import Preprocess
from medvision.progress import progress_bar
from medvision.training.augment import build_augment
from medvision.training.dataset import CachedImages, decode_all
from medvision.training.distributed import (
    DistInfo,
    ShardedSampler,
    barrier,
    cleanup,
    device_for,
    gather,
    init_from_env,
)
from medvision.training.models import create_model

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.safetensors"



def _full_decodes(augment_cfg, pre: Preprocess, rows, show_progress: bool, cache: dict):
    """The training images decoded at full resolution too, when augmentation draws from them
    (``augment.full_decode``) and the contract reduces; else None."""
    if not (augment_cfg.enabled and augment_cfg.full_decode > 0 and pre.cfg.decode_long_side):
        return None
    full = Preprocess(pre.cfg.model_copy(update={"decode_long_side": 0}))
    images, kept = decode_all(rows, full, "decode train (full resolution)", show_progress, **cache)
    if len(kept) != len(rows):
        raise ConfigError("some training images decode under the contract but not at full resolution: turn "
                          "train.augment.full_decode off")
    return images

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    """AdamW groups: no decay on biases, norms and embeddings; layer-wise lr decay when configured."""
    t = cfg.train
    if t.layer_decay:
        from timm.optim import param_groups_layer_decay

        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        groups = param_groups_layer_decay(model, t.weight_decay, skip, layer_decay=t.layer_decay)
        for g in groups:
            g["lr"] = t.lr * g.pop("lr_scale", 1.0)
        return groups
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, ds: CachedImages, batch_size: int,
                   device: torch.device | str = "cpu", precision: str = "fp32") -> np.ndarray:
    """float32 logits for every image of ``ds``, in order (the model in eval mode)."""
    device = torch.device(device)
    model.eval()
    out = []
    for x, _ in DataLoader(ds, batch_size=batch_size, shuffle=False):
        with _autocast(device, precision):
            logits = model(x.to(device))
        out.append(logits.float().squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predict_probs(model: torch.nn.Module, ds: CachedImages, batch_size: int,
                  device: torch.device | str = "cpu", precision: str = "fp32") -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(predict_logits(model, ds, batch_size, device, precision))).numpy()


def _rng_state(sampler_gen: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "sampler": sampler_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, sampler_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    sampler_gen.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _same_run(saved: RunConfig, cfg: RunConfig) -> None:
    for section in ("model", "preprocess", "train", "distill"):
        a, b = getattr(saved, section).model_dump(), getattr(cfg, section).model_dump()
        if section == "train":  # a budget or a patience may change when resuming; the recipe may not
            for k in ("max_minutes", "early_stopping", "tensorboard"):
                a.pop(k), b.pop(k)
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(f"cannot resume: the run was trained with other {section} settings ({', '.join(diff)})")


def train(cfg: RunConfig, out_dir: str | os.PathLike, show_progress: bool = True, resume: bool = False,
          on_epoch_end=None) -> dict:
    """Run training as configured; returns the metrics dict also written to ``metrics.json``.

    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoints are written (tests use it to
    interrupt a run); ``resume=True`` continues from ``out_dir/last.pt``. Under ``torchrun`` every rank
    calls this; rank 0 writes the files.
    """
    cfg = _absolute_paths(cfg)
    dist_info = init_from_env(cfg.train.device)
    try:
        return _train(cfg, out_dir, show_progress and dist_info.is_main, resume, on_epoch_end, dist_info)
    finally:
        cleanup(dist_info)


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Resolve data and teacher paths, so the saved config.yaml works from any working directory."""
    data = {k: str(Path(v).resolve()) for k in ("manifest", "labels_csv", "image_dir", "split_file", "cache_dir")
            if (v := getattr(cfg.data, k))}
    update = {"data": cfg.data.model_copy(update=data)}
    if cfg.distill.teacher:
        update["distill"] = cfg.distill.model_copy(update={"teacher": str(Path(cfg.distill.teacher).resolve())})
    return cfg.model_copy(update=update)


def _train(cfg: RunConfig, out_dir: str | os.PathLike, show_progress: bool, resume: bool, on_epoch_end,
           dist_info: DistInfo) -> dict:
    main = dist_info.is_main
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / LAST
    checkpoint = None
    if resume:
        if not last_path.is_file():
            raise ConfigError(f"cannot resume: {last_path} does not exist (was the run started with this medvision?)")
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
        _same_run(RunConfig.model_validate_json(checkpoint["config"]), cfg)
        if checkpoint.get("world_size", 1) != dist_info.world_size:
            raise ConfigError(f"cannot resume: the run used {checkpoint.get('world_size', 1)} process(es), "
                              f"this one {dist_info.world_size}; the sample order would differ")
    rows = load_rows(cfg.data.labels_csv, cfg.data.image_dir, cfg.data.manifest)
    if main:
        save_config(cfg, out / "config.yaml")
    t = cfg.train
    seed_everything(t.seed)
    if dist_info.enabled:  # dropout / drop-path differ per rank; the sample order does not (sampler_gen)
        torch.manual_seed(t.seed + 1000 * dist_info.rank)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = device_for(dist_info, resolve_device(t.device))

    if cfg.data.split_file:
        assignment = read_split(cfg.data.split_file)
    elif checkpoint is not None and (out / "split.csv").is_file():
        assignment = read_split(out / "split.csv")
    else:
        assignment = patient_split(rows, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    check_split(rows, assignment)
    if main:
        write_split(out / "split.csv", rows, assignment)
    by_split = {s: [r for r in rows if assignment[r.patient_id] == s] for s in ("train", "val")}
    for s, rs in by_split.items():
        if len({r.label for r in rs}) < 2:
            raise ConfigError(f"the {s} split needs both classes; it has {len(rs)} image(s) of one class")

    pre = Preprocess(cfg.preprocess)
    cache = {"cache_dir": cfg.data.cache_dir, "use_cache": cfg.data.cache, "workers": cfg.data.decode_workers}
    if not main:  # rank 0 decodes into the cache first; the others then read it
        barrier(dist_info)
    train_imgs, train_rows = decode_all(by_split["train"], pre, "decode train", show_progress, **cache)
    val_imgs, val_rows = decode_all(by_split["val"], pre, "decode val", show_progress, **cache)
    full_imgs = _full_decodes(t.augment, pre, train_rows, show_progress, cache)
    if main:
        barrier(dist_info)
    y_train = np.array([r.label for r in train_rows])
    y_val = np.array([r.label for r in val_rows])
    t_logits = None
    if cfg.distill.teacher:
        from medvision.training.distill import teacher_config_check, teacher_logits

        teacher_config_check(cfg.distill.teacher)
        out.mkdir(parents=True, exist_ok=True)
        if not main:
            barrier(dist_info)
        t_logits = teacher_logits(cfg.distill.teacher, train_rows, out,
                                  lambda r, p, d, sp: decode_all(r, p, d, sp, **cache), show_progress)
        if main:
            barrier(dist_info)
    train_ds = CachedImages(train_imgs, y_train, pre, build_augment(t.augment, t.seed), seed=t.seed, extra=t_logits,
                            alternate=full_imgs, alternate_share=t.augment.full_decode)
    val_ds = CachedImages(val_imgs, y_val, pre)

    sampler_gen = torch.Generator().manual_seed(t.seed)
    counts = np.bincount(y_train, minlength=2).astype(float)
    if t.imbalance == "sampler":
        weights = torch.as_tensor(1.0 / counts[y_train], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(y_train), replacement=True, generator=sampler_gen)
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=sampler_gen)
    if dist_info.enabled:
        sampler = ShardedSampler(sampler, dist_info.rank, dist_info.world_size)
    drop_last = len(sampler) > t.batch_size
    loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                        drop_last=drop_last)

    model = create_model(cfg.model, cfg.preprocess.image_size).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    optim = torch.optim.AdamW(_param_groups(model, cfg), lr=t.lr)
    steps_per_epoch = max(math.ceil(len(loader) / t.accumulate), 1)
    total = steps_per_epoch * t.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(int(t.warmup_epochs * steps_per_epoch), total))
    ema = None
    if t.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.ema_decay)
    if cfg.distill.teacher and getattr(model, "dist_head", None) is not None:
        model.return_dist = True  # training returns (pooled, distillation-token) logits
    fwd = model
    if dist_info.enabled:
        fwd = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        fwd = torch.compile(fwd)
    pos_weight = torch.tensor([counts[0] / max(counts[1], 1.0)], device=device) if t.imbalance == "loss" else None
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    history: list[dict] = []
    best = {"val_auroc": -1.0, "epoch": -1}
    start_epoch, stale, elapsed_before = 0, 0, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optim.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        history, best, stale = checkpoint["history"], checkpoint["best"], checkpoint["stale"]
        start_epoch, elapsed_before = checkpoint["epoch"], checkpoint["elapsed_s"]
        rng = checkpoint["rng"]
        _set_rng_state(rng[dist_info.rank] if isinstance(rng, list) else rng, sampler_gen)
        log.info("resuming after epoch %d of %d (best val AUROC %.4f at epoch %d)", start_epoch, t.epochs,
                 best["val_auroc"], best["epoch"])
        if start_epoch >= t.epochs or checkpoint.get("stopped"):
            log.info("the run had already finished; writing its final metrics again")

    writer = _tensorboard(out) if t.tensorboard and main else None
    started = time.monotonic()
    log.info("training %s (%.1f M parameters) on %d images, validating on %d, device %s, %s%s", cfg.model.name,
             n_params / 1e6, len(train_ds), len(val_ds), device, t.precision,
             f", rank {dist_info.rank} of {dist_info.world_size} ({len(sampler)} samples per epoch)"
             if dist_info.enabled else "")
    stopped = bool(checkpoint and checkpoint.get("stopped"))
    for epoch in range(start_epoch, t.epochs):
        if stopped:
            break
        model.train()
        train_ds.set_epoch(epoch)
        running, seen = 0.0, 0
        optim.zero_grad(set_to_none=True)
        with progress_bar(f"epoch {epoch + 1}/{t.epochs}", total=len(loader), enabled=show_progress) as advance:
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device), y.to(device)
                if t.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device, t.precision):
                    out_ = fwd(x)
                if t_logits is not None:
                    from medvision.training.distill import distill_loss

                    # a distillation token (DeiT) gets the teacher term, the pooled logit the labels
                    logits, dist = (out_[0].float(), out_[1].float()) if isinstance(out_, tuple) else (out_.float(), None)
                    loss = distill_loss(logits, y[:, :1], y[:, 1:], cfg.distill, pos_weight, dist)
                else:
                    loss = loss_fn(out_.float(), y)
                (loss / t.accumulate).backward()
                if (i + 1) % t.accumulate == 0 or i + 1 == len(loader):
                    if t.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                    optim.step()
                    sched.step()
                    optim.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model)
                running += loss.item() * len(x)
                seen += len(x)
                if writer is not None:
                    writer.add_scalar("train/loss", loss.item(), epoch * len(loader) + i)
                advance(status=f"loss {running / seen:.4f}")
        scored = ema.module if ema is not None else model
        probs = predict_probs(scored, val_ds, t.batch_size, device, t.precision)
        val_auc = auroc(y_val, probs)
        eps = 1e-7
        val_loss = float(-np.mean(y_val * np.log(probs + eps) + (1 - y_val) * np.log(1 - probs + eps)))
        record = {"epoch": epoch + 1, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                  "val_auroc": val_auc, "lr": sched.get_last_lr()[0],
                  "elapsed_s": elapsed_before + time.monotonic() - started}
        history.append(record)
        if writer is not None:
            for k in ("val_loss", "val_auroc", "lr"):
                writer.add_scalar(f"val/{k[4:]}" if k.startswith("val_") else k, record[k], epoch + 1)
            writer.flush()
        if main:
            log.info("epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f", epoch + 1, record["train_loss"],
                     val_loss, val_auc)
        # Every rank validates the same weights on the same images, so every rank takes the same decisions.
        if val_auc > best["val_auroc"] or best["epoch"] < 0:
            best = {"val_auroc": val_auc, "epoch": epoch + 1}
            stale = 0
            if main:
                _save_checkpoint(scored, cfg, out / BEST, epoch + 1, val_auc)
        else:
            stale += 1
        if t.early_stopping and stale >= t.early_stopping:
            log.info("early stopping after epoch %d: no better validation AUROC for %d epochs", epoch + 1, stale)
            stopped = True
        rng = gather(dist_info, _rng_state(sampler_gen))
        if main:
            _atomic_torch_save({
                "config": cfg.model_dump_json(), "model": model.state_dict(), "optimizer": optim.state_dict(),
                "scheduler": sched.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch + 1, "history": history, "best": best, "stale": stale, "stopped": stopped,
                "elapsed_s": record["elapsed_s"], "rng": rng if dist_info.enabled else rng[0],
                "medvision_version": __version__, "world_size": dist_info.world_size,
            }, last_path)
        barrier(dist_info)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        out_of_time = bool(t.max_minutes and (time.monotonic() - started) / 60 > t.max_minutes)
        if gather(dist_info, out_of_time)[0]:  # rank 0 decides for all, or the others would wait forever
            log.warning("stopping after epoch %d: train.max_minutes=%s reached (resume with --resume)", epoch + 1,
                        t.max_minutes)
            break
    if writer is not None:
        writer.close()

    checksums = gather(dist_info, float(sum(p.detach().double().sum() for p in model.parameters())))
    if not main:
        return {}
    # Operating point from the best checkpoint's validation scores.
    best_model = create_model(cfg.model.model_copy(update={"pretrained": None}), cfg.preprocess.image_size,
                              weights_follow=True)
    best_model.load_state_dict(load_file(str(out / BEST)))
    best_model.to(device)
    probs = predict_probs(best_model, val_ds, t.batch_size, device, t.precision)
    threshold = threshold_for_sensitivity(y_val, probs, t.target_sensitivity)
    sens, spec = sensitivity_specificity(y_val, probs, threshold)
    metrics = {
        "model": cfg.model.name, "parameters": n_params, "medvision_version": __version__,
        "images": {"train": len(train_ds), "val": len(val_ds)},
        "best_epoch": best["epoch"], "val_auroc": auroc(y_val, probs),
        "threshold": threshold, "operating_point": f"sensitivity >= {t.target_sensitivity:.2f} on validation",
        "val_sensitivity": sens, "val_specificity": spec,
        "pretrained": cfg.model.pretrained or "none (random initialisation)",
        "history": history, "train_seconds": history[-1]["elapsed_s"] if history else 0.0,
        "reproducibility": {
            "seed": t.seed, "split_seed": cfg.data.split_seed, "deterministic": t.deterministic,
            "device": str(device), "precision": t.precision, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "resumed": checkpoint is not None,
            "world_size": dist_info.world_size, "parameter_checksums": checksums,
            "imbalance": t.imbalance,
        },
        "distillation": cfg.distill.model_dump() if cfg.distill.teacher else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_curves(history, out / "curves.png")
    return metrics


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install 'medvision-radiology[train]')")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _plot_curves(history: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None or not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=110)
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    a.set_xlabel("epoch")
    a.legend(frameon=False)
    b.plot(epochs, [h["val_auroc"] for h in history], color="#d1495b")
    b.set_xlabel("epoch")
    b.set_ylabel("validation AUROC")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _save_checkpoint(model: torch.nn.Module, cfg: RunConfig, path: Path, epoch: int, val_auroc: float) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={
        "config": cfg.model_dump_json(), "epoch": str(epoch), "val_auroc": f"{val_auroc:.6f}",
        "medvision_version": __version__,
    })
    os.replace(tmp, path)
