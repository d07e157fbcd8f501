"""The model's heatmap over the image, as a DICOM Secondary Capture a PACS viewer can show next to the exam.

The heatmap lives on the model-input grid (after crop, orientation and resize); every output pixel is
mapped back through the preprocessing's geometry, so the colours sit on the breast where the model saw
them, in the image's own orientation, not in the flipped / cropped model view. Colour encodes the
per-location cancer logit relative to this image's range (a heatmap says *where*, the SR says *how
likely*); outside the model's field of view the image is left grey.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from medvision.preprocess import to_display

MAX_SIDE = 1024


def _colormap(v: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue -> yellow -> red ramp for v in [0, 1]; (..., 3) floats in [0, 1]."""
    stops = np.array([[0.05, 0.10, 0.55], [0.10, 0.60, 0.85], [0.95, 0.90, 0.20], [0.90, 0.15, 0.10]])
    x = np.clip(v, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    t = (x - i)[..., None]
    return stops[i] * (1 - t) + stops[i + 1] * t


def _bilinear(grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    gh, gw = grid.shape
    x = np.clip(x, 0, gw - 1)
    y = np.clip(y, 0, gh - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, gw - 1), np.minimum(y0 + 1, gh - 1)
    tx, ty = x - x0, y - y0
    top = grid[y0, x0] * (1 - tx) + grid[y0, x1] * tx
    bottom = grid[y1, x0] * (1 - tx) + grid[y1, x1] * tx
    return top * (1 - ty) + bottom * ty


def heat_layer(engine, path: str | Path, max_side: int = MAX_SIDE,
               images=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """On the displayed image (``rendering.display_size``): its greys, the heatmap normalised to [0, 1] per image,
    the mask of pixels inside the model's field of view, and the image's probability.

    The model sees the image as its contract decodes it (the pixels it was scored on); the greys come from a
    decode at the display's resolution. Both are placed by the image's own rows and columns, so the colours land
    where the model looked whatever the two resolutions are. ``images``: the review UI's ``DecodedImages``, where
    both decodes are kept for its other renderings of the image."""
    from medvision.serving.rendering import display_size, read_for_display

    # as ``engine.preprocess.read`` reads it (at the contract's long side), through ``images`` where given
    stored, meta = read_for_display(images, path, engine.limits, engine.preprocess.cfg.decode_long_side)
    x = engine.preprocess(stored, meta)
    probability, heat = engine.run_with_heatmap(x[None])
    heat = heat[0, 0]
    geo = engine.preprocess.geometry(stored, meta)
    shown, shown_meta = read_for_display(images, path, engine.limits, max_side)
    grey = to_display(shown, shown_meta, engine.preprocess.cfg).astype(np.float32)
    oh, ow = display_size(meta.rows, meta.columns, max_side)
    ys = (np.arange(oh) + 0.5) * (meta.rows / oh)  # output pixel centres, in the image's own pixels
    xs = (np.arange(ow) + 0.5) * (meta.columns / ow)
    h, w = grey.shape
    small = grey[np.minimum((ys / shown_meta.decode_factor).astype(int), h - 1)][
        :, np.minimum((xs / shown_meta.decode_factor).astype(int), w - 1)]
    ix, iy = geo.to_input(xs[None, :], ys[:, None])
    gh, gw = heat.shape
    fx, fy = ix / geo.size * gw, iy / geo.size * gh  # continuous heatmap-grid coordinates
    inside = (fx >= 0) & (fx < gw) & (fy >= 0) & (fy < gh) & geo.covers(xs[None, :], ys[:, None])
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    v = np.where(inside, _bilinear(norm, fx - 0.5, fy - 0.5), 0.0)  # cell centres at +0.5
    return small, v, inside, float(probability[0])


def _alpha(v: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """More opaque where the model looked harder, transparent outside its field of view."""
    return np.where(inside, 0.15 + 0.45 * v, 0.0)


def colour_layer(v: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """RGBA uint8: the colour ramp with ``_alpha`` as its opacity (the review UI's overlay)."""
    alpha = _alpha(v, inside)
    rgba = np.concatenate([_colormap(v), alpha[..., None]], axis=-1)
    return (np.clip(rgba, 0, 1) * 255).round().astype(np.uint8)


def overlay(engine, path: str | Path, images=None) -> tuple[np.ndarray, float]:
    """RGB uint8 image (long side <= 1024) with the heatmap blended in, and the image's probability (``images``: as
    ``heat_layer``'s)."""
    small, v, inside, probability = heat_layer(engine, path, images=images)
    alpha = _alpha(v, inside)[..., None]
    rgb = small[..., None] * (1 - alpha) + _colormap(v) * alpha
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), probability


def build_capture(engine, path: str | Path, series_instance_uid: str, instance_number: int,
                  series_number: int = 9902, sop_instance_uid: str | None = None, images=None) -> hd.sc.SCImage:
    """The heatmap over the image as a Secondary Capture for the PACS (``images``: a ``DecodedImages``, which decodes
    in a decoding worker what would hold the service's GIL)."""
    rgb, _ = overlay(engine, path, images)
    ref = dcmread(path, stop_before_pixels=True)
    orientation = tuple(ref.get("PatientOrientation", []) or ()) or None
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=instance_number, manufacturer="medvision",
        patient_orientation=orientation if orientation and len(orientation) == 2 else ("A", "R"),
        laterality=str(ref.get("ImageLaterality", ref.get("Laterality", ""))) or None,
    )
    capture.SeriesDescription = "medvision heatmap (research use only)"
    capture.BurnedInAnnotation = "NO"
    capture.ImageComments = f"model {engine.meta.model_name}: where the model looked; see the SR for the probability"
    capture.SourceImageSequence = [_reference(ref)]
    return capture


def _reference(ref):
    from pydicom import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    return item
