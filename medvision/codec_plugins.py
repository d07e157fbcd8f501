"""JPEG-LS, RLE Lossless and greyscale JPEG decoded without holding the GIL: pydicom decoding plugins built on
imagecodecs.

pydicom's own plugins for these syntaxes (pyjpegls's CharLS, pylibjpeg-rle, GDCM for JPEG) hold the GIL for the whole
decode (a full-field JPEG-LS mammogram about 150 ms, RLE 30 ms, lossless JPEG 230 ms), so a process that also runs
an event loop or other decodes stops meanwhile. imagecodecs wraps the same CharLS, a PackBits decoder and
libjpeg-turbo 3 with the GIL let go: the same pixels, bit for bit (lossless, and JPEG-LS near-lossless decoding is
exactly specified; lossy JPEG as DCMTK's and GDCM's libjpeg decode it), with the calling process's other threads
running. An RLE frame's segments (one per byte of each sample) are independent: with ``resolution.decode_threads()``
above 1 they are decoded side by side.

JPEG (baseline, extended 8/12-bit, lossless processes 14 and 14 SV1) is decoded here only for one sample per pixel:
libjpeg-turbo reads a colour stream's colour space from its markers where DICOM states it in the header, and the
decoders disagree on streams without those markers, so colour is left to pydicom's other plugins. libjpeg-turbo
decodes lossless JPEG in a fifth of GDCM's time and, unlike the GDCM that pip installs here, 12-bit JPEG Extended.

``register()`` adds the plugins (label ``"imagecodecs"``) to pydicom's decoders; ``dicom_io`` prefers them where
imagecodecs is installed, and falls back to pydicom's others where it is not.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import imagecodecs
except ImportError:  # pragma: no cover - a core dependency; pydicom's own plugins decode without it
    imagecodecs = None

LABEL = "imagecodecs"
JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
RLE = "1.2.840.10008.1.2.5"
JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")
DECODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs") for uid in (*JPEG_LS, RLE, *JPEG)}

_registered = False
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child has none of its parent's threads: it starts its own pool if it needs one
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def is_available(uid: str) -> bool:
    """pydicom's plugin interface: whether this plugin decodes ``uid`` here (imagecodecs built with its codec)."""
    if imagecodecs is None or uid not in DECODER_DEPENDENCIES:
        return False
    codec = imagecodecs.PACKBITS if uid == RLE else imagecodecs.JPEGLS if uid in JPEG_LS else imagecodecs.JPEG8
    return bool(getattr(codec, "available", False))


def gil_free(uid: str | None) -> bool:
    """Whether ``uid``'s pixel data is decoded with the GIL let go (this plugin, preferred where available; for JPEG,
    greyscale pixel data: all that ``read_dicom`` reads)."""
    return uid is not None and is_available(uid)


def register() -> None:
    """Add the plugins to pydicom's JPEG-LS and RLE decoders (once; pydicom's own stay as fallbacks)."""
    global _registered
    if _registered or imagecodecs is None:
        return
    from pydicom.pixels.decoders import (
        JPEGBaseline8BitDecoder,
        JPEGExtended12BitDecoder,
        JPEGLosslessDecoder,
        JPEGLosslessSV1Decoder,
        JPEGLSLosslessDecoder,
        JPEGLSNearLosslessDecoder,
        RLELosslessDecoder,
    )

    with _lock:  # pydicom's add_plugin is not thread-safe
        if _registered:
            return
        for decoder, function in ((JPEGLSLosslessDecoder, "decode_jpeg_ls"),
                                  (JPEGLSNearLosslessDecoder, "decode_jpeg_ls"), (RLELosslessDecoder, "decode_rle"),
                                  (JPEGBaseline8BitDecoder, "decode_jpeg"), (JPEGExtended12BitDecoder, "decode_jpeg"),
                                  (JPEGLosslessDecoder, "decode_jpeg"), (JPEGLosslessSV1Decoder, "decode_jpeg")):
            if LABEL not in decoder.available_plugins:
                decoder.add_plugin(LABEL, (__name__, function))
        _registered = True


def decode_jpeg_ls(src: bytes, runner) -> np.ndarray:
    """One JPEG-LS frame (pydicom's ``DecodeRunner`` interface): colour by pixel, in a container sized to the
    codestream's precision, as the runner is told."""
    arr = imagecodecs.jpegls_decode(src)
    if arr.ndim == 3:
        runner.set_option("planar_configuration", 0)
    runner.set_option("bits_allocated", 8 * arr.dtype.itemsize)
    # colour by pixel, in one contiguous buffer (a stream interleaved by plane comes back as a view), little endian
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


def decode_jpeg(src: bytes, runner) -> np.ndarray:
    """One greyscale JPEG frame (pydicom's ``DecodeRunner`` interface), in the DICOM header's Bits Allocated (as GDCM
    returns it: an 8-bit stream in 16 bits allocated keeps its values, and the sign is taken from Bits Stored). Colour
    is refused: pydicom's other plugins decode it (see the module's docstring)."""
    if runner.samples_per_pixel != 1:
        raise ValueError("colour JPEG is left to pydicom's other plugins")
    container = np.dtype(f"<u{max(1, runner.bits_allocated // 8)}")
    arr = imagecodecs.jpeg8_decode(src)
    if arr.ndim != 2:
        raise ValueError(f"the JPEG codestream holds {arr.shape[-1]} components, the DICOM header one sample")
    if arr.dtype.itemsize > container.itemsize:  # the reader refuses such a stream before decoding
        raise ValueError(f"the JPEG codestream's samples are wider than the {runner.bits_allocated} bits allocated")
    return np.ascontiguousarray(arr, dtype=container)


def decode_rle(src: bytes, runner) -> np.ndarray:
    """One RLE Lossless frame (PS3.5 Annex G; pydicom's ``DecodeRunner`` interface): little endian, colour by plane.
    A frame holds one segment per byte of each sample, most significant byte first (``rle_segment_order`` '>', the
    standard's; '<' for files written the other way round)."""
    rows, columns, samples = runner.rows, runner.columns, runner.samples_per_pixel
    width = runner.bits_allocated // 8
    if runner.bits_allocated % 8 or width not in (1, 2, 4, 8):
        raise ValueError(f"RLE Lossless of {runner.bits_allocated}-bit samples is not decoded here")
    pixels = rows * columns
    if len(src) < 64:
        raise ValueError(f"the RLE header is {len(src)} bytes long, expected 64")
    count, *offsets = struct.unpack("<16L", src[:64])
    if not 1 <= count <= 15:
        raise ValueError(f"the RLE header names {count} segments: a frame holds 1 to 15")
    if count != samples * width:
        raise ValueError(f"the RLE header names {count} segments; {samples} samples of {8 * width} bits need "
                         f"{samples * width}")
    ends = [*offsets[1:count], len(src)]
    starts = offsets[:count]
    if any(not 64 <= a <= b <= len(src) for a, b in zip(starts, ends, strict=True)):
        raise ValueError(f"the RLE header's segment offsets {starts} do not fit a frame of {len(src)} bytes")
    view = memoryview(src)
    segments = [view[a:b] for a, b in zip(starts, ends, strict=True)]
    planes = _map(_segment, segments, [pixels] * count)
    order = runner.get_option("rle_segment_order", ">")
    out = np.empty((samples, pixels), np.dtype(f"<u{width}"))
    for s in range(samples):
        bytes_ = planes[s * width:(s + 1) * width]
        if order == ">":  # most significant first: the last segment is the low byte
            bytes_ = bytes_[::-1]
        if width == 1:
            out[s] = bytes_[0]
        elif width == 2:  # the common case, in two passes (a strided byte copy takes twice as long)
            np.left_shift(bytes_[1], 8, out=out[s], dtype=out.dtype)
            np.bitwise_or(out[s], bytes_[0], out=out[s])
        else:
            lanes = out[s].view(np.uint8).reshape(pixels, width)
            for b, plane in enumerate(bytes_):
                lanes[:, b] = plane
    runner.set_option("planar_configuration", 1)
    return out


class _Frame:
    """What the decode functions ask of pydicom's ``DecodeRunner``, for one greyscale frame decoded directly."""

    samples_per_pixel = 1

    def __init__(self, rows: int, columns: int, bits_allocated: int) -> None:
        self.rows, self.columns, self.bits_allocated = rows, columns, bits_allocated
        self._options: dict = {}

    def get_option(self, name: str, default=None):
        return self._options.get(name, default)

    def set_option(self, name: str, value) -> None:
        if name == "bits_allocated":
            self.bits_allocated = value
        self._options[name] = value


def decode_greyscale(uid: str, codestream, rows: int, columns: int, bits_allocated: int, bits_stored: int,
                     signed: bool, precision: int | None = None) -> np.ndarray:
    """One greyscale frame's stored values, as pydicom's ``pixel_array`` returns them through these plugins for a
    single-frame image whose sample attributes it accepts (``dicom_io`` holds the call to those), without its copies
    (the pixel data read into the dataset, a second array filled, the bits corrected in two passes): a full-field RLE
    image read at 1/16 in 25 ms instead of 42. ``codestream``: the frame's bytes (a view is enough); ``precision``:
    for signed JPEG-LS, the precision pydicom's sign correction uses (its parser's reading of the frame header, else
    Bits Stored). As pydicom does: the decoded samples read in the container the decoder says (JPEG-LS: its
    precision's), signed or not as the header says, widened to Bits Allocated; then JPEG-LS's signed samples
    sign-extended from its precision, and RLE's and JPEG's bits above Bits Stored cleared (or, signed, the sign
    extended from Bits Stored)."""
    frame = _Frame(rows, columns, bits_allocated)
    if uid in JPEG_LS:
        decoded = decode_jpeg_ls(codestream, frame)
    elif uid == RLE:
        decoded = decode_rle(codestream, frame)
    elif uid in JPEG:
        decoded = decode_jpeg(codestream, frame)
    else:
        raise ValueError(f"{uid} is not decoded by this plugin")
    kind = "i" if signed else "u"
    got = decoded.reshape(-1).view(f"<{kind}{frame.bits_allocated // 8}")
    if got.size != rows * columns:
        raise ValueError(f"the frame decoded to {got.size} samples, the header says {rows} x {columns}")
    arr = got.astype(f"<{kind}{bits_allocated // 8}", copy=False).reshape(rows, columns)
    if uid in JPEG_LS:  # pydicom's JPEG-LS sign correction (its unused bits are left as decoded)
        shift = 8 * arr.dtype.itemsize - (precision or bits_stored)
        if signed and shift > 0:
            np.left_shift(arr, shift, out=arr)
            np.right_shift(arr, shift, out=arr)
    elif bits_allocated > bits_stored:
        if signed:
            shift = bits_allocated - bits_stored
            np.left_shift(arr, shift, out=arr)
            np.right_shift(arr, shift, out=arr)
        else:  # the same as shifting left and back, in one pass
            np.bitwise_and(arr, (1 << bits_stored) - 1, out=arr)
    return arr


def _segment(data: memoryview, pixels: int) -> np.ndarray:
    """One segment's plane. Padding past the plane is ignored, as pydicom's own decoder ignores it, but no more than
    twice a plane is ever written, whatever the runs claim (a 2-byte run stands for 128 bytes: a hostile segment
    could otherwise ask for 64 times its own size)."""
    try:
        decoded = imagecodecs.packbits_decode(data, out=2 * pixels + 2)
    except imagecodecs.PackbitsError as exc:
        if "OUTPUT_TOO_SMALL" in str(exc):
            raise ValueError(f"an RLE segment decodes to more than twice the {pixels} bytes of its plane") from None
        raise
    if len(decoded) < pixels:
        raise ValueError(f"an RLE segment decoded to {len(decoded)} bytes, expected {pixels}")
    return np.frombuffer(decoded, np.uint8, count=pixels)


def _map(function, *iterables) -> list:
    """``function`` over the arguments, on ``decode_threads()`` threads where there are more than one (the calling
    thread takes its share)."""
    from medvision.cores import usable_cores
    from medvision.resolution import decode_threads

    args = list(zip(*iterables, strict=True))
    threads = min(decode_threads(), len(args))
    if threads <= 1:
        return [function(*a) for a in args]
    global _pool
    with _lock:
        if _pool is None:
            cores = usable_cores()
            _pool = ThreadPoolExecutor(cores, thread_name_prefix="medvision-decode")  # the cores this process may use
        pool = _pool

    def share(k: int) -> list:
        return [function(*a) for a in args[k::threads]]

    others = [pool.submit(share, k) for k in range(1, threads)]
    shares = [share(0), *(f.result() for f in others)]
    out = [None] * len(args)
    for k, part in enumerate(shares):
        out[k::threads] = part
    return out
