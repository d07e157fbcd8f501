"""Images for the review UI: windowed greyscale PNGs and heatmap overlays, cached on disk.

The browser never receives DICOM: it gets the image rendered here through the same reader and DICOM
grey pipeline the model uses (modality LUT / rescale, VOI window or LUT, MONOCHROME1 inversion), with
the long side limited to what a screen shows. Window / level changes are renderings at another window
(centre and width in modality units); the presets are the file's own window and windows derived from
the image's value distribution. The heatmap is a transparent RGBA layer of the same size, mapped back
through the preprocessing's geometry, so it sits on the image whatever crop or flip the model used.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from medvision.dicom_io import (
    HINT_BYTES,
    DecodeElsewhere,
    DicomMeta,
    ReadLimits,
    decodes_without_gil,
    read_dicom,
)
from medvision.errors import DicomError
from medvision.preprocess import apply_window, has_window, modality_values, needs_inversion, to_display

SIZES = (512, 1024, 2048)
PNG_LEVEL = 3  # zlib's level: half the encoding time of its default (6) for files 15-45 % larger


def display_size(rows: int, columns: int, max_side: int) -> tuple[int, int]:
    """``(height, width)`` of an image of ``rows`` x ``columns`` shown with its long side at most ``max_side``: the
    size of every rendering (image and heatmap alike), whatever resolution it was decoded at."""
    f = min(1.0, max_side / max(rows, columns))
    return max(1, round(rows * f)), max(1, round(columns * f))


def _shrink(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if grey.shape == size:
        return grey
    img = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BOX))


class DecodedImages:
    """The images the review UI decoded last, kept in memory (at most ``max_bytes``, pixels, lookup tables and a
    little per image counted; the least recently used go first; 0 keeps none): opening a study decodes each view
    once for its window presets, its rendering and its heatmap, and a window change renders again without decoding
    again. Keyed by the file (its path, inode, size and modification time: a file replaced is decoded afresh), the
    resolution and the read limits. Requests for the same image at once share one decode, and its refusal. The arrays
    handed out are read-only. ``elsewhere`` (``DecodePool.read``): where a file's decoder would hold the GIL
    throughout (``read_dicom``'s ``gil_free_only``), it is decoded there, in a worker process, and the service's event
    loop goes on answering meanwhile (a full-field JPEG-LS image holds it 160 ms, a full-size JPEG 2000 one 0.5 s).
    A file's refusal (``DicomError``: damaged, unsupported, a decoder that crashed on it or outlasted its time) is
    remembered for ``REFUSED_SECONDS`` while the file stays the same: a view that kills its decoding worker does not
    kill one more at every page the reader opens."""

    ENTRY_BYTES = 4096  # what an image's metadata and bookkeeping take beyond its arrays, about
    REFUSED_SECONDS = 600.0
    REFUSED_MAX = 256  # refusals remembered at most (the oldest forgotten first)

    def __init__(self, max_bytes: int, elsewhere: Callable | None = None) -> None:
        self.max_bytes = max_bytes
        self.elsewhere = elsewhere
        self.size = 0
        self._items: OrderedDict[tuple, tuple[tuple[np.ndarray, DicomMeta], int]] = OrderedDict()
        self._loading: dict[tuple, _Loading] = {}
        self._refused: OrderedDict[tuple, tuple[DicomError, float]] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: str | Path, limits: ReadLimits, long_side: int) -> tuple[np.ndarray, DicomMeta]:
        """``read_dicom(path, limits, long_side=long_side)``, from memory when it was read lately."""
        if self.max_bytes <= 0:
            return _read_only(self._decode(path, limits, long_side))
        st = os.stat(path)
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, long_side, limits)
        with self._lock:
            if (hit := self._items.get(key)) is not None:
                self._items.move_to_end(key)
                return hit[0]
            if (refused := self._refused.get(key)) is not None and refused[1] > time.monotonic():
                raise type(refused[0])(refused[0].message)
            loading = self._loading.get(key)
            mine = loading is None
            if mine:
                loading = self._loading[key] = _Loading()
        if not mine:  # another request is decoding it: its outcome
            loading.done.wait()
            if loading.error is not None:
                raise loading.error
            return loading.value
        try:
            loading.value = _read_only(self._decode(path, limits, long_side))
        except BaseException as exc:
            loading.error = exc
            raise
        finally:
            with self._lock:
                del self._loading[key]
                if loading.value is not None:
                    self._keep(key, loading.value)
                elif isinstance(loading.error, DicomError):  # the file's own: not a busy or stopping service
                    self._refused[key] = (loading.error, time.monotonic() + self.REFUSED_SECONDS)
                    self._refused.move_to_end(key)
                    while len(self._refused) > self.REFUSED_MAX:
                        self._refused.popitem(last=False)
            loading.done.set()
        return loading.value

    def _decode(self, path: str | Path, limits: ReadLimits, long_side: int) -> tuple[np.ndarray, DicomMeta]:
        if self.elsewhere is None:
            return read_dicom(path, limits, long_side=long_side)
        try:
            with open(path, "rb") as fh:
                head = fh.read(HINT_BYTES)
        except OSError:  # read_dicom names what is wrong with the path
            head = b""
        if decodes_without_gil(head, long_side):
            try:  # held to decoders that let the event loop run, whatever the file's meta suggested
                return read_dicom(path, limits, long_side=long_side, gil_free_only=True)
            except DecodeElsewhere:
                pass
        return self.elsewhere(path, limits, long_side)

    def _keep(self, key: tuple, value: tuple[np.ndarray, DicomMeta]) -> None:
        stored, meta = value
        luts = sum(lut.table.nbytes for lut in (meta.modality_lut, meta.voi_lut) if lut is not None)
        cost = stored.nbytes + luts + self.ENTRY_BYTES
        if cost > self.max_bytes:
            return  # decoded for this request (and those waiting on it), not kept
        self._items[key] = (value, cost)
        self.size += cost
        while self.size > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.size -= old


class _Loading:
    """One decode in progress, and its outcome for the requests waiting on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: tuple[np.ndarray, DicomMeta] | None = None
        self.error: BaseException | None = None


def _read_only(value: tuple[np.ndarray, DicomMeta]) -> tuple[np.ndarray, DicomMeta]:
    value[0].flags.writeable = False
    return value


def read_for_display(images: DecodedImages | None, path: str | Path, limits: ReadLimits,
                     long_side: int) -> tuple[np.ndarray, DicomMeta]:
    """The image at ``long_side`` (``read_dicom``), through ``images`` where given."""
    return images.read(path, limits, long_side) if images is not None else read_dicom(path, limits, long_side=long_side)


def image_info(path: str | Path, limits: ReadLimits, images: DecodedImages | None = None) -> dict:
    """What the viewer needs to label an image and offer window presets (no identifiers). The value statistics
    come from the image decoded at 1024 px: the presets need the distribution, not every pixel."""
    stored, meta = read_for_display(images, path, limits, 1024)
    values = modality_values(stored, meta)
    body = values[values > values.min()] if np.ptp(values) > 0 else values.ravel()
    if body.size == 0:
        body = values.ravel()
    p = np.percentile(body, [1, 20, 50, 99, 99.5])
    lo, hi = float(values.min()), float(values.max())

    def window(a: float, b: float) -> dict:
        return {"center": round((a + b) / 2, 3), "width": round(max(b - a, 1.0), 3)}

    presets = {}
    if has_window(meta):
        presets["default"] = {"center": meta.window_centers[0], "width": meta.window_widths[0]}
    else:
        presets["default"] = window(p[0], p[3])
    presets.update({"full range": window(lo, hi), "soft tissue": window(p[1], p[4]), "dense": window(p[2], p[4])})
    return {"sop_instance_uid": meta.sop_instance_uid, "laterality": meta.laterality or "", "view": meta.view or "",
            "rows": meta.rows, "columns": meta.columns, "range": [lo, hi], "presets": presets,
            "inverted": needs_inversion(meta.photometric, meta.presentation_lut_shape)}


def render(path: str | Path, limits: ReadLimits, cfg, max_side: int, center: float | None = None,
           width: float | None = None, images: DecodedImages | None = None) -> bytes:
    """8-bit greyscale PNG: the file's default display (``to_display``, as the model sees it before its
    geometry) or the given window in modality units; bright = dense either way. Decoded at the coarsest
    resolution that still fills ``max_side`` (``medvision.resolution``)."""
    stored, meta = read_for_display(images, path, limits, max_side)
    if center is None or width is None:
        grey = to_display(stored, meta, cfg)
    else:
        grey = apply_window(modality_values(stored, meta), center, max(width, 1.0), "LINEAR")
        if needs_inversion(meta.photometric, meta.presentation_lut_shape):
            grey = 1.0 - grey
    small = _shrink(grey, display_size(meta.rows, meta.columns, max_side))
    buf = io.BytesIO()
    grey8 = (np.clip(small, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(grey8, mode="L").save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def render_heatmap(engine, path: str | Path, max_side: int, images: DecodedImages | None = None) -> bytes:
    """RGBA PNG of the model's heatmap for this image, the same size as ``render`` at ``max_side``."""
    from medvision.serving.heatmap_capture import colour_layer, heat_layer

    _, v, inside, _ = heat_layer(engine, path, max_side, images)
    img = Image.fromarray(colour_layer(v, inside), mode="RGBA")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


class RenderCache:
    """PNG renderings on disk, keyed by the image, the artifact (for heatmaps) and the rendering's parameters.

    Bounded: past ``max_bytes`` the least recently used renderings are deleted (a hit refreshes a file's time),
    down to 90 % of the bound. Files are 0600: they are pictures of patients. ``max_bytes`` = 0 caches nothing.
    """

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.size = sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        return [p for p in self.folder.glob("*/*.png") if p.is_file()]

    def get(self, make, *key) -> bytes:
        if self.max_bytes <= 0:
            return make()
        name = hashlib.sha256(repr(key).encode()).hexdigest()
        path = self.folder / name[:2] / f"{name}.png"
        try:
            data = path.read_bytes()
            os.utime(path)
            return data
        except FileNotFoundError:
            pass
        data = make()
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        with self._lock:
            self.size += len(data)
            if self.size > self.max_bytes:
                self._evict()
        return data

    def _evict(self) -> None:
        files = []
        for p in self._files():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        files.sort()
        self.size = sum(size for _, size, _ in files)
        for _, size, p in files:
            if self.size <= 0.9 * self.max_bytes:
                break
            p.unlink(missing_ok=True)
            self.size -= size
