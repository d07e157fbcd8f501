"""A torch Dataset over DICOM files, decoded once through the shared ``Preprocess`` into the on-disk cache."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from medvision.cache import CachedArray, ImageCache, decode_many
from medvision.data import ImageRow
from medvision.preprocess import Preprocess
from medvision.training.augment import augment

log = logging.getLogger(__name__)


def decode_all(
    rows: list[ImageRow], pre: Preprocess, desc: str, show_progress: bool = True,
    cache_dir: str | None = None, use_cache: bool = True, workers: int = 0,
) -> tuple[CachedArray | np.ndarray, list[ImageRow]]:
    """Decode and preprocess every image once, through the decode-once cache unless ``use_cache`` is off.

    Unreadable files are logged by their row number and reason (never by identifiers) and dropped.
    """
    paths = [r.path for r in rows]
    if use_cache:
        images, kept, errors = ImageCache(pre, cache_dir).load(paths, workers, desc=desc, show_progress=show_progress)
    else:
        decoded = decode_many(paths, pre, workers, desc=desc, show_progress=show_progress)
        kept = [i for i, (img, _) in enumerate(decoded) if img is not None]
        errors = {i: err for i, (img, err) in enumerate(decoded) if img is None}
        size = pre.cfg.image_size
        images = np.stack([decoded[i][0] for i in kept]) if kept else np.zeros((0, size, size), np.float32)
    for i, err in sorted(errors.items())[:20]:
        log.warning("%s: skipping row %d: %s", desc, i + 1, err)
    if len(errors) > 20:
        log.warning("%s: %d more unreadable image(s) skipped", desc, len(errors) - 20)
    return images, [rows[i] for i in kept]


class CachedImages(Dataset):
    """Pre-decoded [0, 1] images (an array or the memory-mapped cache); random augmentation, then normalisation.

    Augmentation is re-seeded for every sample from ``(seed, epoch, index)``: the same epoch gives the
    same augmented images whatever the number of loader workers, and a resumed run continues exactly.
    """

    def __init__(self, images, labels: np.ndarray, pre: Preprocess, transform=None, seed: int = 0,
                 extra: np.ndarray | None = None, alternate=None, alternate_share: float = 0.0,
                 paired: bool = False) -> None:
        """``extra`` (e.g. a teacher's logits) travels with the label: targets become ``[label, extra]``.
        ``alternate`` (the same images decoded another way, e.g. at full resolution) replaces an image in
        ``alternate_share`` of the draws, seeded like the augmentation; or, ``paired``, comes with it: a sample
        is then ``(2, 1, size, size)``, the image and its alternate under the same augmentation."""
        self.images, self.labels, self.pre, self.transform = images, labels.astype(np.float32), pre, transform
        self.extra = None if extra is None else np.asarray(extra, dtype=np.float32)
        self.alternate, self.alternate_share = alternate, alternate_share if alternate is not None else 0.0
        self.paired = paired and alternate is not None
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        draw = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)
        target = torch.tensor([self.labels[i]] if self.extra is None else [self.labels[i], self.extra[i]])
        if self.paired:  # the same flip, affine, exposure and noise on both decodes
            views = [self._augmented(source[i], draw) for source in (self.images, self.alternate)]
            return torch.from_numpy(np.stack(views)), target
        source = self.images
        if self.alternate_share and np.random.default_rng([draw, 1]).random() < self.alternate_share:
            source = self.alternate
        return torch.from_numpy(self._augmented(source[i], draw)), target

    def _augmented(self, image, draw: int) -> np.ndarray:
        if self.transform is not None:
            self.transform.set_random_seed(draw)
        return self.pre.finish(augment(self.transform, np.asarray(image)))
