"""The one deterministic preprocessing path, shared by training, export checks and serving.

Pure numpy functions, composed by ``Preprocess(cfg)``. The order follows the DICOM grey-scale
pipeline (PS3.4 N.2): modality LUT (sequence or rescale) -> VOI LUT (window or table) -> MONOCHROME1 / Presentation
LUT inversion; then the model-specific steps: crop to the breast, canonical orientation, aspect-preserving resize / pad,
normalisation. Random augmentation lives in ``medvision.training`` and never runs here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medvision.dicom_io import DicomMeta, ReadLimits, Source, read_dicom
from medvision.errors import PreprocessError
from medvision.resolution import lowpass, reduction


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
    decode_long_side: int = Field(
        0, ge=0, le=16384, description="the long side, in pixels, the crop and resize need: images are decoded at "
        "the coarsest power-of-two reduction that keeps it: JPEG 2000's own low-pass band (its finest wavelet levels "
        "never decoded; other syntaxes get the same band computed, bit for bit); 0 decodes every pixel. Part of the contract: a model is served as it was trained")
    crop_long_side: int | None = Field(
        None, ge=0, le=16384, description="the long side, in pixels, of the 5/3 low-pass band the breast's box is "
        "measured on (None: image_size): the same pixels whatever the image was decoded at, so every decode contract "
        "crops the same region; 0 measures it on the decoded pixels (artifacts written before this setting)")

    @model_validator(mode="after")
    def _decode_not_below_input(self) -> PreprocessConfig:
        if 0 < self.decode_long_side < self.image_size:
            raise ValueError(f"decode_long_side {self.decode_long_side} is below image_size {self.image_size}: the "
                             "model would see upsampled pixels (use 0 for full resolution, or >= image_size)")
        return self

    @property
    def decoding(self) -> str:
        """The decode contract in words (model card, logs)."""
        return (f"decoded at the coarsest power-of-two reduction with a long side of at least {self.decode_long_side}"
                " px" if self.decode_long_side else "decoded at full resolution")


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
    if not _float32_safe(center, width):  # a centre or width float32 cannot hold (or divide by): in float64
        values = values.astype(np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, got {width}")
        # 1 / (1 + exp(-4x)) written as a tanh, which cannot overflow for far-out values
        return (0.5 * (1.0 + np.tanh(2.0 * ((values - center) / width)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
        out = (values - (center - width / 2.0)) / width
    else:
        if width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
        if width == 1:  # PS3.3 C.11.2.1.2.1 with w = 1: a threshold at c - 0.5 (the formula would divide by zero)
            return (values > center - 0.5).astype(np.float32)
        out = ((values - (center - 0.5)) / (width - 1.0)) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _float32_safe(center: float, width: float) -> bool:
    """Whether a window's arithmetic stays finite in float32 (values there are far below these bounds): a width of
    6.8e38 overflows float32 to inf, and inf / inf is NaN. Files that declare such windows are decoded in float64."""
    return abs(center) + abs(width) < 1e30 and abs(width) > 1e-30


def apply_lut_table(values: np.ndarray, first_mapped: int, table: np.ndarray) -> np.ndarray:
    """LUT Sequence lookup (modality or VOI): inputs below / above the table clamp to its ends."""
    if values.dtype.kind in "iub":  # exact, in a type wide enough for any first mapped value (no wrap-around)
        idx = np.clip(values.astype(np.int64) - int(first_mapped), 0, len(table) - 1)
    else:  # NaN (an overflowed rescale) maps to the first entry, infinities to the ends
        idx = np.clip(np.nan_to_num(np.rint(values.astype(np.float64) - first_mapped), nan=0.0, posinf=len(table),
                                    neginf=-1.0), 0, len(table) - 1).astype(np.int64)
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
    table = display_table(stored, meta, cfg)
    return _display_chain(stored, meta, cfg) if table is None else table[_as_index(stored)]


def has_window(meta: DicomMeta) -> bool:
    """Whether the file's first VOI window can be used: a finite centre and a finite, positive width (a window of
    NaN or infinity, which a DS value can spell, is treated as no window)."""
    return bool(meta.window_centers and meta.window_widths and math.isfinite(meta.window_centers[0])
                and math.isfinite(meta.window_widths[0]) and meta.window_widths[0] > 0)


def display_table(stored: np.ndarray, meta: DicomMeta, cfg: PreprocessConfig) -> np.ndarray | None:
    """The display grey of every possible stored value, indexed by the values' unsigned bit pattern; None
    when the chain cannot be tabulated (wider or float pixels, colour, or percentile windows, which depend on
    the image)."""
    uses_percentiles = not (cfg.voi == "dicom" and (has_window(meta) or meta.voi_lut is not None))
    if stored.dtype not in (np.uint8, np.int8, np.uint16, np.int16) or stored.ndim != 2 or uses_percentiles:
        return None
    domain = np.arange(1 << (8 * stored.dtype.itemsize), dtype=_as_index(stored).dtype).view(stored.dtype)[None, :]
    return _display_chain(domain, meta, cfg)[0]


def _as_index(stored: np.ndarray) -> np.ndarray:
    return stored.view(np.dtype(f"uint{stored.dtype.itemsize * 8}"))


def modality_values(stored: np.ndarray, meta: DicomMeta) -> np.ndarray:
    """Modality LUT Sequence or rescale slope / intercept: stored values -> modality units (float32)."""
    if meta.modality_lut is not None:
        return apply_lut_table(stored, meta.modality_lut.first_mapped, meta.modality_lut.table)
    return apply_rescale(stored, meta.rescale_slope, meta.rescale_intercept)


def _display_chain(stored: np.ndarray, meta: DicomMeta, cfg: PreprocessConfig) -> np.ndarray:
    values = modality_values(stored, meta)
    if cfg.voi == "dicom" and has_window(meta):
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


FOREGROUND_LEVEL = 0.08  # display grey above which a pixel is tissue, not air
FOREGROUND_MIN_FRACTION = 0.01  # rows / columns with fewer tissue pixels than this are background


def foreground_box(grey: np.ndarray, level: float = FOREGROUND_LEVEL,
                   min_fraction: float = FOREGROUND_MIN_FRACTION) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (exclusive ends) of the rows / columns where more than
    ``min_fraction`` of pixels exceed ``level``; the whole image when nothing passes.

    Background (air, after windowing and inversion) is near 0; isolated noise pixels and thin labels
    do not pass the fraction test.
    """
    return _box_of(grey > level, min_fraction)


def _box_of(mask: np.ndarray, min_fraction: float) -> tuple[int, int, int, int]:
    # counts / n in float64 is exactly what mask.mean() computes, at a third of the cost
    rows = np.flatnonzero(np.add.reduce(mask, axis=1, dtype=np.int64) / mask.shape[1] > min_fraction)
    cols = np.flatnonzero(np.add.reduce(mask, axis=0, dtype=np.int64) / mask.shape[0] > min_fraction)
    if rows.size == 0 or cols.size == 0:
        return 0, mask.shape[0], 0, mask.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _foreground_mask(stored: np.ndarray, table: np.ndarray, level: float) -> np.ndarray:
    """``table[stored] > level`` without a per-pixel lookup when the tabulated chain is monotone in the stored
    value (a window, inverted or not): then the pixels above the level are those on one side of a cut value."""
    passes = table > level
    signed = stored.dtype.kind == "i"
    half = len(passes) // 2
    in_value_order = np.concatenate([passes[half:], passes[:half]]) if signed else passes
    edges = np.flatnonzero(in_value_order[1:] != in_value_order[:-1])
    if edges.size == 0:
        return np.full(stored.shape, bool(in_value_order[0]))
    if edges.size == 1:
        cut = int(edges[0]) + 1 - (half if signed else 0)  # the first stored value of the second run
        return stored >= cut if in_value_order[-1] else stored < cut
    return passes[_as_index(stored)]


def display_and_box(stored: np.ndarray, meta: DicomMeta, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Display greys, cropped to the foreground box when ``cfg.crop_to_breast``, and the box in stored pixels.

    Exactly ``to_display`` then ``foreground_box`` and the crop, but for tabulated chains the box comes from
    the stored values (a threshold when the chain is monotone) and only the pixels inside it are looked up:
    on a mammogram most of the cost of the grey-scale pipeline.
    """
    h, w = stored.shape[:2]
    table = display_table(stored, meta, cfg)
    coarse = _box_levels(stored, meta, cfg) if cfg.crop_to_breast else 0
    if coarse:
        box = _coarse_box(stored, meta, cfg, table, coarse)
        if table is None:  # percentile windows depend on the whole image: the chain runs on it, then the crop
            return _display_chain(stored, meta, cfg)[box[0]:box[1], box[2]:box[3]], box
    elif table is None:
        grey = _display_chain(stored, meta, cfg)
        top, bottom, left, right = foreground_box(grey) if cfg.crop_to_breast else (0, h, 0, w)
        return grey[top:bottom, left:right], (top, bottom, left, right)
    else:
        box = (_box_of(_foreground_mask(stored, table, FOREGROUND_LEVEL), FOREGROUND_MIN_FRACTION)
               if cfg.crop_to_breast else (0, h, 0, w))
    top, bottom, left, right = box
    return table[_as_index(stored[top:bottom, left:right])], box


def _box_levels(stored: np.ndarray, meta: DicomMeta, cfg: PreprocessConfig) -> int:
    """How many more 5/3 low-pass levels above the decoded pixels the box is measured at (0: on them). The level
    is fixed in the image's own size (``crop_long_side``, else ``image_size``), not in the decoded one, so a
    full decode and a reduced one measure the box on the same pixels."""
    long_side = cfg.image_size if cfg.crop_long_side is None else cfg.crop_long_side
    if not long_side or stored.ndim != 2 or stored.dtype.kind not in "iu":
        return 0
    target = reduction(meta.rows or stored.shape[0], meta.columns or stored.shape[1], long_side)
    factor = max(1, meta.decode_factor)
    return max(0, target.bit_length() - factor.bit_length())


def _coarse_box(stored: np.ndarray, meta: DicomMeta, cfg: PreprocessConfig, table: np.ndarray | None,
                levels: int) -> tuple[int, int, int, int]:
    """The breast's box measured on the low-pass band ``levels`` steps above ``stored``, in ``stored``'s pixels:
    every edge a whole number of coarse pixels (clipped to the image)."""
    small = lowpass(stored, levels, meta.bits_stored, meta.signed)
    mask = (_foreground_mask(small, table, FOREGROUND_LEVEL) if table is not None
            else _display_chain(small, meta, cfg) > FOREGROUND_LEVEL)
    top, bottom, left, right = _box_of(mask, FOREGROUND_MIN_FRACTION)
    h, w, k = stored.shape[0], stored.shape[1], 1 << levels
    return top * k, min(h, bottom * k), left * k, min(w, right * k)


def needs_flip(grey: np.ndarray) -> bool:
    half = grey.shape[1] // 2
    return bool(grey[:, half:].sum() > grey[:, :half].sum())


def orient_chest_wall_left(grey: np.ndarray) -> np.ndarray:
    """Flip horizontally when the right half holds more tissue, so every breast points right.

    Pixel-based on purpose: archives disagree on Patient Orientation, the pixels do not.
    """
    return grey[:, ::-1] if needs_flip(grey) else grey


def resize_pad(grey: np.ndarray, size: int, resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize the longer side to ``size`` (antialiased bilinear; ``resample`` another of Pillow's filters, which
    only benchmarks ask for), pad the rest with 0 (air).

    The image is centred vertically and kept against the left edge (the chest wall after orienting).
    """
    h, w = grey.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F").resize(
            (nw, nh), resample
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
    """Where the image's pixels land in the model input: crop box, horizontal flip, scale and padding. The image
    may have been decoded at 1/``factor`` of its size (the decode contract); coordinates given to ``to_input`` and
    ``covers`` are always the DICOM image's own (its Rows and Columns), whatever it was decoded at."""

    box: tuple[int, int, int, int]  # top, bottom, left, right of the crop in decoded pixels
    flipped: bool
    scale: float  # model-input pixels per decoded pixel
    top_pad: int
    size: int
    factor: int = 1  # decoded pixels are this many image pixels wide

    @property
    def image_scale(self) -> float:
        """Model-input pixels per image pixel."""
        return self.scale / self.factor

    def to_input(self, x, y):
        """Image coordinates (column x, row y, pixel centres at +0.5; floats or arrays) -> model-input coordinates."""
        t, _, left, right = self.box
        cx, cy = x / self.factor - left, y / self.factor - t
        if self.flipped:
            cx = (right - left) - cx
        return cx * self.scale, cy * self.scale + self.top_pad

    def covers(self, x, y):
        """Whether image coordinates fall inside the crop (floats or arrays)."""
        t, b, left, right = self.box
        dx, dy = x / self.factor, y / self.factor
        return (dx >= left) & (dx < right) & (dy >= t) & (dy < b)


class Preprocess:
    """``Preprocess(cfg)(stored, meta) -> float32 array (1, size, size)``, the model's input."""

    def __init__(self, cfg: PreprocessConfig | None = None) -> None:
        self.cfg = cfg or PreprocessConfig()

    def steps(self, meta: DicomMeta) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
        cfg = self.cfg
        name = "to_display and crop_to_foreground" if cfg.crop_to_breast else "to_display"
        steps: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [
            (name, lambda a: display_and_box(a, meta, cfg)[0])]
        if cfg.orientation == "chest_wall_left":
            steps.append(("orient_chest_wall_left", orient_chest_wall_left))
        steps.append(("resize_pad", lambda a: resize_pad(a, cfg.image_size)))
        return steps

    def display(self, stored: np.ndarray, meta: DicomMeta) -> np.ndarray:
        """The oriented, resized image in [0, 1] before normalisation (for augmentation, the cache and viewing)."""
        out = stored
        for name, fn in self.steps(meta):
            out = _run_step(name, fn, out)
        return out

    def finish(self, grey: np.ndarray) -> np.ndarray:
        """The last step, the only place normalisation happens: a ``display`` image (cached, augmented or not)
        -> the model's input (1, size, size)."""
        return normalize(np.asarray(grey), self.cfg.mean, self.cfg.std)[None, :, :]

    def __call__(self, stored: np.ndarray, meta: DicomMeta) -> np.ndarray:
        return self.finish(self.display(stored, meta))

    def geometry(self, stored: np.ndarray, meta: DicomMeta) -> Geometry:
        """The geometric decisions ``display`` takes for this image, to map coordinates (e.g. lesions)."""
        crop, box = display_and_box(stored, meta, self.cfg)
        flipped = self.cfg.orientation == "chest_wall_left" and needs_flip(crop)
        h, w = crop.shape
        scale = self.cfg.image_size / max(h, w)
        nh = max(1, round(h * scale))
        return Geometry(box, flipped, scale, (self.cfg.image_size - nh) // 2, self.cfg.image_size, meta.decode_factor)

    def read(self, source: Source, limits: ReadLimits = ReadLimits(), identifiers: dict[str, str] | None = None,
             gil_free_only: bool = False, ahead=None) -> tuple[np.ndarray, DicomMeta]:
        """The stored pixels at the resolution this preprocessing's contract needs (``decode_long_side``), and the
        meta (``meta.decode`` says how): the one way training, evaluation, export, quantization, the gate, the
        service, batch scoring and the review UI read an image for the model (``gil_free_only``, ``ahead``:
        ``read_dicom``'s)."""
        return read_dicom(source, limits, identifiers, long_side=self.cfg.decode_long_side,
                          gil_free_only=gil_free_only, ahead=ahead)

    def from_dicom(self, source: Source, limits: ReadLimits = ReadLimits()) -> tuple[np.ndarray, DicomMeta]:
        stored, meta = self.read(source, limits)
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
