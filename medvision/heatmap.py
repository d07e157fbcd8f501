"""Judging heatmaps against known lesions: the pointing game (numpy only).

A heatmap "hits" when its peak cell lies on a lesion: the peak cell's centre is within the lesion's
radius plus half the cell's diagonal (a coarse 14 x 14 token grid cannot point closer than that).
The chance rate is what a point drawn uniformly over the breast would score: the fraction of the breast
covered by the (enlarged) lesion disks.
"""

from __future__ import annotations

import math

import numpy as np


def peak_xy(heat: np.ndarray, size: int) -> tuple[float, float, float]:
    """Model-input coordinates ``(x, y)`` of the centre of the hottest cell, and the cell's half diagonal."""
    h = np.asarray(heat, dtype=np.float64).squeeze()
    rows, cols = h.shape
    i, j = np.unravel_index(int(np.argmax(h)), h.shape)
    ch, cw = size / rows, size / cols
    return (j + 0.5) * cw, (i + 0.5) * ch, 0.5 * math.hypot(ch, cw)


def pointing_hit(heat: np.ndarray, size: int, lesions: list[tuple[float, float, float]]) -> bool:
    """``lesions``: ``(x, y, radius)`` in model-input pixels."""
    px, py, slack = peak_xy(heat, size)
    return any(math.hypot(px - x, py - y) <= r + slack for x, y, r in lesions)


def chance_rate(foreground: np.ndarray, heat_shape: tuple[int, int], lesions: list[tuple[float, float, float]]) -> float:
    """Hit probability of a uniformly random point on the foreground (``foreground``: bool, input size)."""
    size = foreground.shape[0]
    slack = 0.5 * math.hypot(size / heat_shape[0], size / heat_shape[1])
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    covered = np.zeros_like(foreground, dtype=bool)
    for x, y, r in lesions:
        covered |= (xx - x) ** 2 + (yy - y) ** 2 <= (r + slack) ** 2
    area = foreground.sum()
    return float((covered & foreground).sum() / area) if area else 0.0
