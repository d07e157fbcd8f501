"""One way to score a torch model on images: the device, mixed precision, and logits / probabilities for a dataset
(``CachedImages``) or for decoded images. Training's validation, evaluation and the distillation teacher use it."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from medvision.errors import ConfigError
from medvision.preprocess import Preprocess
from medvision.training.dataset import CachedImages


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
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
        with autocast(device, precision):
            logits = model(x.to(device))
        out.append(logits.float().squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def predict_probs(model: torch.nn.Module, ds: CachedImages, batch_size: int,
                  device: torch.device | str = "cpu", precision: str = "fp32") -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(predict_logits(model, ds, batch_size, device, precision))).numpy()


def image_logits(model: torch.nn.Module, images, pre: Preprocess, batch_size: int = 32) -> np.ndarray:
    """Logits for decoded images (``display`` images, as the cache holds them), float64 for the statistics."""
    return predict_logits(model, CachedImages(images, np.zeros(len(images)), pre), batch_size).astype(np.float64)
