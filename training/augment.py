"""Random augmentation for greyscale mammograms (albumentations), applied only in training.

Chosen for X-ray: geometric jitter a positioning technologist would produce, exposure / detector
differences (brightness, contrast, gamma) and quantum noise. No colour jitter (grey images) and no
left-right flip: preprocessing already puts the chest wall on the left, a flip would undo that.
"""

from __future__ import annotations

import albumentations as A
import numpy as np

from medvision.config import AugmentConfig


def build_augment(cfg: AugmentConfig, seed: int) -> A.Compose | None:
    """The training augmentation; ``seed`` makes it repeatable (albumentations keeps its own RNG)."""
    if not cfg.enabled:
        return None
    return A.Compose(seed=seed, transforms=[
        A.VerticalFlip(p=cfg.flip_vertical),
        A.Affine(
            scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
            border_mode=0, fill=0, p=cfg.affine,
        ),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=cfg.brightness_contrast),
        A.RandomGamma(gamma_limit=(80, 125), p=cfg.gamma),
        A.GaussNoise(std_range=(0.005, 0.02), p=cfg.noise),
    ])


def augment(transform: A.Compose | None, grey: np.ndarray) -> np.ndarray:
    """Apply ``transform`` to a [0, 1] float image; the result stays in [0, 1]."""
    if transform is None:
        return grey
    return np.clip(transform(image=grey)["image"], 0.0, 1.0).astype(np.float32)
