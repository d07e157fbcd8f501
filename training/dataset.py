"""A torch Dataset over DICOM files: decoded once through the shared ``Preprocess``, cached in memory."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from medvision.data import ImageRow
from medvision.dicom_io import read_dicom
from medvision.errors import DicomError
from medvision.preprocess import Preprocess, normalize
from medvision.progress import progress_bar
from medvision.training.augment import augment

log = logging.getLogger(__name__)


def decode_all(rows: list[ImageRow], pre: Preprocess, desc: str, show_progress: bool = True) -> tuple[np.ndarray, list[ImageRow]]:
    """Decode and resize every image once (pixel codecs release the GIL, so threads overlap).

    Unreadable files are logged by image id and dropped, never fatal.
    """
    def load(row: ImageRow):
        try:
            stored, meta = read_dicom(row.path)
            return pre.display(stored, meta)
        except DicomError as exc:
            log.warning("skipping image %s: %s", row.image_id, exc.message)
            return None

    images, kept = [], []
    threads = min(4, os.cpu_count() or 1)
    with progress_bar(desc, total=len(rows), enabled=show_progress) as advance, ThreadPoolExecutor(threads) as pool:
        for row, img in zip(rows, pool.map(load, rows), strict=True):
            if img is not None:
                images.append(img)
                kept.append(row)
            advance()
    size = pre.cfg.image_size
    stack = np.stack(images) if images else np.zeros((0, size, size), np.float32)
    return stack, kept


class CachedImages(Dataset):
    """Pre-decoded [0, 1] images; random augmentation (if any) then the shared normalisation."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pre: Preprocess, transform=None) -> None:
        self.images, self.labels, self.pre, self.transform = images, labels.astype(np.float32), pre, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        grey = augment(self.transform, self.images[i])
        x = normalize(grey, self.pre.cfg.mean, self.pre.cfg.std)[None]
        return torch.from_numpy(x), torch.tensor([self.labels[i]])
