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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, WeightedRandomSampler

from medvision import __version__
from medvision.config import RunConfig, save_config
from medvision.cores import physical_cores
from medvision.data import check_split, patient_split, read_split, write_split
from medvision.errors import ConfigError
from medvision.manifest import load_rows
from medvision.metrics import auroc, sensitivity_specificity, threshold_for_sensitivity
from medvision.plots import pyplot
from medvision.preprocess import Preprocess
from medvision.progress import progress_bar
from medvision.training.augment import build_augment
from medvision.training.dataset import CachedImages, decode_all
from medvision.training.distill import distill_loss, teacher_config_check, teacher_logits
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
from medvision.training.predict import autocast, predict_probs, resolve_device

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.safetensors"



def _full_decodes(augment_cfg, pre: Preprocess, rows, show_progress: bool, cache: dict):
    """The training images decoded at full resolution too, when augmentation draws from them
    (``augment.full_decode``) or pairs them with the contract's (``augment.consistency``) and the contract reduces;
    else None."""
    if not (augment_cfg.enabled and (augment_cfg.full_decode > 0 or augment_cfg.consistency > 0)
            and pre.cfg.decode_long_side):
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
    checkpoint = _checkpoint_to_resume(out, cfg, dist_info) if resume else None
    rows = load_rows(cfg.data.labels_csv, cfg.data.image_dir, cfg.data.manifest)
    if main:
        save_config(cfg, out / "config.yaml")
    t = cfg.train
    _seed_and_settle(t, dist_info)
    device = device_for(dist_info, resolve_device(t.device))
    data = _data(cfg, out, rows, checkpoint is not None, dist_info, show_progress)
    loader, sampler, sampler_gen = _loader(data, t, dist_info)
    steps = _Steps.build(cfg, device, data, len(loader), dist_info)

    history: list[dict] = []
    best = {"val_auroc": -1.0, "epoch": -1}
    start_epoch, stale, elapsed_before = 0, 0, 0.0
    if checkpoint is not None:
        steps.restore(checkpoint)
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
             steps.parameters / 1e6, len(data.train), len(data.val), device, t.precision,
             f", rank {dist_info.rank} of {dist_info.world_size} ({len(sampler)} samples per epoch)"
             if dist_info.enabled else "")
    stopped = bool(checkpoint and checkpoint.get("stopped"))
    for epoch in range(start_epoch, t.epochs):
        if stopped:
            break
        train_loss = steps.epoch(loader, data.train, epoch, writer, show_progress)
        scored = steps.scored
        val_auc, val_loss = _validate(scored, data, t, device)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                  "val_auroc": val_auc, "lr": steps.sched.get_last_lr()[0],
                  "elapsed_s": elapsed_before + time.monotonic() - started}
        history.append(record)
        _log_epoch(writer, record, main)
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
                "config": cfg.model_dump_json(), **steps.state(),
                "epoch": epoch + 1, "history": history, "best": best, "stale": stale, "stopped": stopped,
                "elapsed_s": record["elapsed_s"], "rng": rng if dist_info.enabled else rng[0],
                "medvision_version": __version__, "world_size": dist_info.world_size,
            }, out / LAST)
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

    checksums = gather(dist_info, float(sum(p.detach().double().sum() for p in steps.model.parameters())))
    if not main:
        return {}
    metrics = _final_metrics(cfg, out, data, device, steps.parameters, history, best, checkpoint is not None,
                             dist_info, checksums)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_curves(history, out / "curves.png")
    return metrics


# -- the steps of a run, in the order they happen ---------------------------------------------------------


def _checkpoint_to_resume(out: Path, cfg: RunConfig, dist_info: DistInfo) -> dict:
    """``out/last.pt``, checked to be this run's (same settings, same number of processes)."""
    last_path = out / LAST
    if not last_path.is_file():
        raise ConfigError(f"cannot resume: {last_path} does not exist (was the run started with this medvision?)")
    checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
    _same_run(RunConfig.model_validate_json(checkpoint["config"]), cfg)
    if checkpoint.get("world_size", 1) != dist_info.world_size:
        raise ConfigError(f"cannot resume: the run used {checkpoint.get('world_size', 1)} process(es), "
                          f"this one {dist_info.world_size}; the sample order would differ")
    return checkpoint


def _seed_and_settle(t, dist_info: DistInfo) -> None:
    seed_everything(t.seed)
    if dist_info.enabled:  # dropout / drop-path differ per rank; the sample order does not (sampler_gen)
        torch.manual_seed(t.seed + 1000 * dist_info.rank)
    if t.threads:
        torch.set_num_threads(t.threads)
    elif not dist_info.enabled and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(physical_cores())  # torch's own count keeps a CPU set but not a CPU quota
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class _Data:
    train: CachedImages
    val: CachedImages
    y_train: np.ndarray
    y_val: np.ndarray
    teacher_logits: np.ndarray | None


def _data(cfg: RunConfig, out: Path, rows, resuming: bool, dist_info: DistInfo, show_progress: bool) -> _Data:
    """The patient-level split (the configured one, the resumed run's, or a new one, written to ``split.csv``), the
    train and validation images decoded through the cache, and the teacher's logits when distilling."""
    main, t = dist_info.is_main, cfg.train
    if cfg.data.split_file:
        assignment = read_split(cfg.data.split_file)
    elif resuming and (out / "split.csv").is_file():
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
        teacher_config_check(cfg.distill.teacher)
        if not main:
            barrier(dist_info)
        t_logits = teacher_logits(cfg.distill.teacher, train_rows, out,
                                  lambda r, p, d, sp: decode_all(r, p, d, sp, **cache), show_progress)
        if main:
            barrier(dist_info)
    train_ds = CachedImages(train_imgs, y_train, pre, build_augment(t.augment, t.seed), seed=t.seed, extra=t_logits,
                            alternate=full_imgs, alternate_share=t.augment.full_decode,
                            paired=t.augment.enabled and t.augment.consistency > 0)
    return _Data(train_ds, CachedImages(val_imgs, y_val, pre), y_train, y_val, t_logits)


def _loader(data: _Data, t, dist_info: DistInfo):
    """The training batches: class-balanced sampling (or plain shuffling), sharded across processes. Returns the
    loader, its sampler and the generator that orders it (saved with each checkpoint)."""
    sampler_gen = torch.Generator().manual_seed(t.seed)
    if t.imbalance == "sampler":
        counts = np.bincount(data.y_train, minlength=2).astype(float)
        weights = torch.as_tensor(1.0 / counts[data.y_train], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(data.y_train), replacement=True,
                                        generator=sampler_gen)
    else:
        sampler = torch.utils.data.RandomSampler(data.train, generator=sampler_gen)
    if dist_info.enabled:
        sampler = ShardedSampler(sampler, dist_info.rank, dist_info.world_size)
    drop_last = len(sampler) > t.batch_size
    loader = DataLoader(data.train, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                        drop_last=drop_last)
    return loader, sampler, sampler_gen


@dataclass
class _Steps:
    """The model and what updates it: optimiser, schedule, EMA, the loss (with the distillation term when there is a
    teacher), and the forward pass (DDP / compiled)."""

    cfg: RunConfig
    device: torch.device
    model: torch.nn.Module
    fwd: torch.nn.Module
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: object | None
    pos_weight: torch.Tensor | None
    distilling: bool

    @classmethod
    def build(cls, cfg: RunConfig, device: torch.device, data: _Data, batches: int, dist_info: DistInfo) -> _Steps:
        t = cfg.train
        model = create_model(cfg.model, cfg.preprocess.image_size).to(device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optim = torch.optim.AdamW(_param_groups(model, cfg), lr=t.lr)
        steps_per_epoch = max(math.ceil(batches / t.accumulate), 1)
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
        counts = np.bincount(data.y_train, minlength=2).astype(float)
        pos_weight = torch.tensor([counts[0] / max(counts[1], 1.0)], device=device) if t.imbalance == "loss" else None
        return cls(cfg, device, model, fwd, optim, sched, ema, pos_weight, data.teacher_logits is not None)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def scored(self) -> torch.nn.Module:
        """The weights validation judges: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def loss(self, out, y: torch.Tensor) -> torch.Tensor:
        if not self.distilling:
            return torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y, pos_weight=self.pos_weight)
        # a distillation token (DeiT) gets the teacher term, the pooled logit the labels
        logits, dist = (out[0].float(), out[1].float()) if isinstance(out, tuple) else (out.float(), None)
        return distill_loss(logits, y[:, :1], y[:, 1:], self.cfg.distill, self.pos_weight, dist)

    def epoch(self, loader, train_ds: CachedImages, epoch: int, writer, show_progress: bool) -> float:
        """One pass over the training batches (with gradient accumulation); the mean training loss."""
        t = self.cfg.train
        self.model.train()
        train_ds.set_epoch(epoch)
        running, seen = 0.0, 0
        self.optim.zero_grad(set_to_none=True)
        with progress_bar(f"epoch {epoch + 1}/{t.epochs}", total=len(loader), enabled=show_progress) as advance:
            for i, (x, y) in enumerate(loader):
                x, y = x.to(self.device), y.to(self.device)
                samples, paired = len(x), x.ndim == 5  # (batch, 2 decodes, 1, size, size): the consistency term
                if paired:
                    x, y = x.transpose(0, 1).flatten(0, 1), y.repeat(2, 1)  # every contract view, then every full one
                if t.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(self.device, t.precision):
                    out = self.fwd(x)
                loss = self.loss(out, y)
                if paired:
                    logits = (out[0] if isinstance(out, tuple) else out).float().reshape(2, -1)
                    loss = loss + t.augment.consistency * (logits[0] - logits[1]).pow(2).mean()
                (loss / t.accumulate).backward()
                if (i + 1) % t.accumulate == 0 or i + 1 == len(loader):
                    self._step()
                running += loss.item() * samples
                seen += samples
                if writer is not None:
                    writer.add_scalar("train/loss", loss.item(), epoch * len(loader) + i)
                advance(status=f"loss {running / seen:.4f}")
        return running / max(seen, 1)

    def _step(self) -> None:
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optim.step()
        self.sched.step()
        self.optim.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optim.state_dict(),
                "scheduler": self.sched.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None}

    def restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optim.load_state_dict(checkpoint["optimizer"])
        self.sched.load_state_dict(checkpoint["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["ema"])


def _validate(model: torch.nn.Module, data: _Data, t, device: torch.device) -> tuple[float, float]:
    """Validation AUROC and log-loss of ``model``."""
    probs = predict_probs(model, data.val, t.batch_size, device, t.precision)
    eps = 1e-7
    y = data.y_val
    return auroc(y, probs), float(-np.mean(y * np.log(probs + eps) + (1 - y) * np.log(1 - probs + eps)))


def _log_epoch(writer, record: dict, main: bool) -> None:
    if writer is not None:
        for k in ("val_loss", "val_auroc", "lr"):
            writer.add_scalar(f"val/{k[4:]}" if k.startswith("val_") else k, record[k], record["epoch"])
        writer.flush()
    if main:
        log.info("epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f", record["epoch"], record["train_loss"],
                 record["val_loss"], record["val_auroc"])


def _final_metrics(cfg: RunConfig, out: Path, data: _Data, device: torch.device, parameters: int,
                   history: list[dict], best: dict, resumed: bool, dist_info: DistInfo, checksums) -> dict:
    """The run's summary, with the operating point chosen on the best checkpoint's validation scores."""
    t = cfg.train
    best_model = create_model(cfg.model.model_copy(update={"pretrained": None}), cfg.preprocess.image_size,
                              weights_follow=True)
    best_model.load_state_dict(load_file(str(out / BEST)))
    best_model.to(device)
    probs = predict_probs(best_model, data.val, t.batch_size, device, t.precision)
    threshold = threshold_for_sensitivity(data.y_val, probs, t.target_sensitivity)
    sens, spec = sensitivity_specificity(data.y_val, probs, threshold)
    return {
        "model": cfg.model.name, "parameters": parameters, "medvision_version": __version__,
        "images": {"train": len(data.train), "val": len(data.val)},
        "best_epoch": best["epoch"], "val_auroc": auroc(data.y_val, probs),
        "threshold": threshold, "operating_point": f"sensitivity >= {t.target_sensitivity:.2f} on validation",
        "val_sensitivity": sens, "val_specificity": spec,
        "pretrained": cfg.model.pretrained or "none (random initialisation)",
        "history": history, "train_seconds": history[-1]["elapsed_s"] if history else 0.0,
        "reproducibility": {
            "seed": t.seed, "split_seed": cfg.data.split_seed, "deterministic": t.deterministic,
            "device": str(device), "precision": t.precision, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "resumed": resumed,
            "world_size": dist_info.world_size, "parameter_checksums": checksums,
            "imbalance": t.imbalance,
        },
        "distillation": cfg.distill.model_dump() if cfg.distill.teacher else None,
    }


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
