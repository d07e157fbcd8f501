"""The one deterministic preprocessing path, shared by training, export checks and serving.

Pure numpy functions, composed by ``Preprocess(cfg)``. The order follows the DICOM grey-scale
pipeline (PS3.4 N.2): modality LUT (sequence or rescale) -> VOI LUT (window or table) -> MONOCHROME1 / Presentation
LUT inversion; then the model-specific steps: crop to the breast, canonical orientation, aspect-preserving resize / pad,
normalisation. Random augmentation lives in ``medvision.training`` and never runs here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medvision.dicom_io import DicomMeta, ReadLimits, Source, read_dicom
from medvision.errors import PreprocessError


class PreprocessConfig(BaseModel):
    """Everything that decides what the model sees; stored in checkpoints and ONNX artifacts."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(224, ge=16, le=4096, description="square model input, pixels")
    voi: Literal["dicom", "percentile"] = Field(
        "dicom", description="'dicom': the file's first window / VOI LUT (percentile if none); 'percentile': ignore it"
    )
    percentiles: tuple[float, float] = (0.5, 99.5)
    orientation: Literal["chest_wall_left", "none"] = Field(
        "chest_wall_left", description="flip so the side with more tissue (chest wall) is on the left"
    )
    crop_to_breast: bool = Field(
        True, description="crop to the bounding box of non-background pixels before resizing (more pixels per lesion)"
    )
    mean: float = 0.5
    std: float = 0.5


# -- the grey-scale pipeline ------------------------------------------------------------------


def apply_rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Modality LUT as Rescale Slope / Intercept: stored values -> modality units (float32)."""
    out = stored.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI window per PS3.3 C.11.2.1.2, mapped to [0, 1].

    LINEAR uses the standard's (c - 0.5, w - 1) form; LINEAR_EXACT the exact one; SIGMOID the logistic.
    """
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, got {width}")
        # 1 / (1 + exp(-4x)) written as a tanh, which cannot overflow for far-out values
        return (0.5 * (1.0 + np.tanh(2.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
        out = (values - (center - width / 2.0)) / width
    else:
        if width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
        out = ((values - (center - 0.5)) / (width - 1.0)) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def apply_lut_table(values: np.ndarray, first_mapped: int, table: np.ndarray) -> np.ndarray:
    """LUT Sequence lookup (modality or VOI): inputs below / above the table clamp to its ends."""
    idx = np.clip(np.rint(values - first_mapped), 0, len(table) - 1).astype(np.int64)
    return table[idx].astype(np.float32, copy=False)


def apply_percentile_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fallback VOI when the file has none: stretch the given percentiles of non-background pixels."""
    flat = values[values > values.min()] if np.ptp(values) > 0 else values.ravel()
    if flat.size == 0:
        flat = values.ravel()
    lo, hi = np.percentile(flat, [low, high])
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def needs_inversion(photometric: str, presentation_lut_shape: str | None) -> bool:
    """True when low values must display white.

    For MONOCHROME1 the Presentation LUT Shape INVERSE (required by the DX / MG IODs) *declares* the
    inversion rather than adding a second one, so it does not flip back.
    """
    if photometric == "MONOCHROME1":
        return True
    return (presentation_lut_shape or "").upper() == "INVERSE"


def to_display(stored: np.ndarray, meta: DicomMeta, cfg: PreprocessConfig) -> np.ndarray:
    """Stored values -> display greys in [0, 1] (bright = dense), following the DICOM order.

    Windows apply before a VOI LUT Sequence when a file has both (the first window is the default
    presentation); percentiles are the fallback when it has neither. For 8- and 16-bit integer pixels
    with a window or VOI LUT, the whole chain is evaluated once per possible stored value and applied
    as one table lookup (as viewers do): the same element-wise arithmetic, so bit-identical, at a
    fraction of the cost on a 3328 x 2560 mammogram.
    """
    uses_percentiles = not (cfg.voi == "dicom" and (
        (meta.window_centers and meta.window_widths and meta.window_widths[0] > 0) or meta.voi_lut is not None))
    if stored.dtype in (np.uint8, np.int8, np.uint16, np.int16) and stored.ndim == 2 and not uses_percentiles:
        unsigned = np.dtype(f"uint{stored.dtype.itemsize * 8}")
        domain = np.arange(1 << (8 * stored.dtype.itemsize), dtype=unsigned).view(stored.dtype)[None, :]
        table = _display_chain(domain, meta, cfg)[0]
        return table[stored.view(unsigned)]
    return _display_chain(stored, meta, cfg)


def modality_values(stored: np.ndarray, meta: DicomMeta) -> np.ndarray:
    """Modality LUT Sequence or rescale slope / intercept: stored values -> modality units (float32)."""
    if meta.modality_lut is not None:
        return apply_lut_table(stored, meta.modality_lut.first_mapped, meta.modality_lut.table)
    return apply_rescale(stored, meta.rescale_slope, meta.rescale_intercept)


def _display_chain(stored: np.ndarray, meta: DicomMeta, cfg: PreprocessConfig) -> np.ndarray:
    values = modality_values(stored, meta)
    if cfg.voi == "dicom" and meta.window_centers and meta.window_widths and meta.window_widths[0] > 0:
        grey = apply_window(values, meta.window_centers[0], meta.window_widths[0], meta.voi_lut_function)
    elif cfg.voi == "dicom" and meta.voi_lut is not None:
        lut = meta.voi_lut
        grey = apply_lut_table(values, lut.first_mapped, lut.table) / np.float32((1 << lut.bits) - 1)
    else:
        grey = apply_percentile_window(values, *cfg.percentiles)
    if needs_inversion(meta.photometric, meta.presentation_lut_shape):
        grey = 1.0 - grey
    return grey


# -- model-specific geometry -------------------------------------------------------------------


def foreground_box(grey: np.ndarray, level: float = 0.08, min_fraction: float = 0.01) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (exclusive ends) of the rows / columns where more than
    ``min_fraction`` of pixels exceed ``level``; the whole image when nothing passes."""
    mask = grey > level
    rows = np.flatnonzero(mask.mean(axis=1) > min_fraction)
    cols = np.flatnonzero(mask.mean(axis=0) > min_fraction)
    if rows.size == 0 or cols.size == 0:
        return 0, grey.shape[0], 0, grey.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_foreground(grey: np.ndarray, level: float = 0.08, min_fraction: float = 0.01) -> np.ndarray:
    """Crop to the foreground box (see ``foreground_box``).

    Background (air, after windowing and inversion) is near 0; isolated noise pixels and thin labels
    do not pass the fraction test. Returns the input unchanged when nothing passes.
    """
    top, bottom, left, right = foreground_box(grey, level, min_fraction)
    return grey[top:bottom, left:right]


def needs_flip(grey: np.ndarray) -> bool:
    half = grey.shape[1] // 2
    return bool(grey[:, half:].sum() > grey[:, :half].sum())


def orient_chest_wall_left(grey: np.ndarray) -> np.ndarray:
    """Flip horizontally when the right half holds more tissue, so every breast points right.

    Pixel-based on purpose: archives disagree on Patient Orientation, the pixels do not.
    """
    return grey[:, ::-1] if needs_flip(grey) else grey


def resize_pad(grey: np.ndarray, size: int) -> np.ndarray:
    """Resize the longer side to ``size`` (antialiased bilinear), pad the rest with 0 (air).

    The image is centred vertically and kept against the left edge (the chest wall after orienting).
    """
    h, w = grey.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F").resize(
            (nw, nh), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    out = np.zeros((size, size), np.float32)
    top = (size - nh) // 2
    out[top : top + nh, :nw] = resized
    return out


def normalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((x - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class Geometry:
    """Where stored pixels land in the model input: crop box, horizontal flip, scale and padding."""

    box: tuple[int, int, int, int]  # top, bottom, left, right of the crop in stored pixels
    flipped: bool
    scale: float
    top_pad: int
    size: int

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Stored-pixel coordinates (column x, row y, pixel centres at +0.5) -> model-input coordinates."""
        t, _, left, right = self.box
        cx, cy = x - left, y - t
        if self.flipped:
            cx = (right - left) - cx
        return cx * self.scale, cy * self.scale + self.top_pad


class Preprocess:
    """``Preprocess(cfg)(stored, meta) -> float32 array (1, size, size)``, the model's input."""

    def __init__(self, cfg: PreprocessConfig | None = None) -> None:
        self.cfg = cfg or PreprocessConfig()

    def steps(self, meta: DicomMeta) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
        cfg = self.cfg
        steps: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [("to_display", lambda a: to_display(a, meta, cfg))]
        if cfg.crop_to_breast:
            steps.append(("crop_to_foreground", crop_to_foreground))
        if cfg.orientation == "chest_wall_left":
            steps.append(("orient_chest_wall_left", orient_chest_wall_left))
        steps.append(("resize_pad", lambda a: resize_pad(a, cfg.image_size)))
        steps.append(("normalize", lambda a: normalize(a, cfg.mean, cfg.std)))
        return steps

    def display(self, stored: np.ndarray, meta: DicomMeta) -> np.ndarray:
        """The oriented, resized image in [0, 1] before normalisation (for augmentation and viewing)."""
        out = stored
        for name, fn in self.steps(meta)[:-1]:
            out = _run_step(name, fn, out)
        return out

    def __call__(self, stored: np.ndarray, meta: DicomMeta) -> np.ndarray:
        out = stored
        for name, fn in self.steps(meta):
            out = _run_step(name, fn, out)
        return out[None, :, :]

    def geometry(self, stored: np.ndarray, meta: DicomMeta) -> Geometry:
        """The geometric decisions ``display`` takes for this image, to map coordinates (e.g. lesions)."""
        grey = to_display(stored, meta, self.cfg)
        box = foreground_box(grey) if self.cfg.crop_to_breast else (0, grey.shape[0], 0, grey.shape[1])
        crop = grey[box[0]:box[1], box[2]:box[3]]
        flipped = self.cfg.orientation == "chest_wall_left" and needs_flip(crop)
        h, w = crop.shape
        scale = self.cfg.image_size / max(h, w)
        nh = max(1, round(h * scale))
        return Geometry(box, flipped, scale, (self.cfg.image_size - nh) // 2, self.cfg.image_size)

    def from_dicom(self, source: Source, limits: ReadLimits = ReadLimits()) -> tuple[np.ndarray, DicomMeta]:
        stored, meta = read_dicom(source, limits)
        return self(stored, meta), meta


def _run_step(name: str, fn: Callable[[np.ndarray], np.ndarray], arr: np.ndarray) -> np.ndarray:
    try:
        return fn(arr)
    except Exception as exc:
        rng = f"[{arr.min():.4g}, {arr.max():.4g}]" if arr.size else "[]"
        raise PreprocessError(
            f"preprocessing step '{name}' failed on an input of shape {arr.shape}, dtype {arr.dtype}, "
            f"range {rng}: {type(exc).__name__}: {exc}"
        ) from exc
