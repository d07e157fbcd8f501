"""Decode only the pixels the model sees: the resolution plan, and the reduced decoders that carry it out.

A model looks at a few hundred pixels; a full-field mammogram has 8.5 million. The preprocessing contract
(``PreprocessConfig.decode_long_side``) states the long side the crop and resize need; ``plan_decode`` picks the
coarsest power-of-two reduction of the image that still has it, from the header alone. The reduced image is
defined as JPEG 2000's own: the low-pass band of ``levels`` steps of the reversible 5/3 wavelet (ISO/IEC 15444-1
Annex F, vertical then horizontal lifting, symmetric extension), rounded as the standard rounds, clamped to the
stored range. So every transfer syntax gives the same pixels:

- JPEG 2000 and HTJ2K: the finest wavelet levels are simply not decoded (OpenJPEG through Pillow), so their
  code-blocks are never entropy-decoded: most of the work. For a lossless (5/3) codestream this *is* the
  reference, bit for bit; a lossy (9/7) one gives its own low-pass band, as close as lossy pixels are. Where the
  codestream is ordered resolution by resolution, the decoder is handed only the kept resolutions' packets
  (``medvision.j2k_prefix``, HTJ2K included): the same pixels, without reading the megabytes of the finest levels.
  A tiled codestream gives each tile's band (its transform is per tile): the same pixels except within two of a
  tile border.
- Uncompressed: the low-pass band computed straight from the file's pixel bytes (a memory map, or a view of the
  request's buffer), with no full-size copy of the input.
- RLE, JPEG-LS and JPEG: no resolution scalability, so a full decode, then the same low-pass band.

The image arrives at 1/factor of its size (``ceil`` of each side) in its stored integer values, before any LUT:
the grey-scale pipeline and the geometry run on it unchanged. What was done is recorded as the plan's text
(``"1/8 wavelet"``: levels skipped, ``"1/8 lowpass"``: computed, ``"full"``) in ``DicomMeta.decode`` and every
score row.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np

from medvision.j2k_prefix import coarse_codestream

J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                          "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass(frozen=True)
class DecodePlan:
    """How one image is decoded: at 1/``factor`` of its size, by ``method``; ``note`` says why a plan changed."""

    factor: int = 1
    method: str = "full"  # "full", "wavelet" (JPEG 2000 levels not decoded) or "lowpass" (computed after decoding)
    note: str = ""

    def __str__(self) -> str:
        text = "full" if self.factor == 1 else f"1/{self.factor} {self.method}"
        return f"{text} ({self.note})" if self.note else text


def reduction(rows: int, columns: int, long_side: int) -> int:
    """The largest power-of-two factor that keeps the image's long side at least ``long_side`` (1: full)."""
    if long_side <= 0:
        return 1
    longest, factor = max(rows, columns), 1
    while 2 * factor <= longest and math.ceil(longest / (2 * factor)) >= long_side:
        factor *= 2
    return factor


def plan_decode(transfer_syntax: str, rows: int, columns: int, long_side: int) -> DecodePlan:
    """The plan for an image of this syntax and size under a contract asking for ``long_side`` pixels."""
    factor = reduction(rows, columns, long_side)
    if factor == 1:
        return DecodePlan()
    return DecodePlan(factor, "wavelet" if transfer_syntax in J2K_SYNTAXES else "lowpass")


# OpenJPEG through Pillow holds the GIL for the whole of a decode (Pillow's JPEG 2000 decoder pulls its bytes through
# Python and never lets go). A reduced decode of up to this many pixels is short enough to run in a thread of a process
# that also runs an event loop: the largest full-field mammograms (4096 x 3328) at 1/8, what a 336 px contract reads,
# are 213 k pixels (23 ms here; 3328 x 2560 at 1/8 11 ms, at 1/16 3 ms; HTJ2K a fifth of that). A larger one,
# such as the review UI's at 1/4 (45 ms) or 1/2 (150-200 ms), would stop the loop that long: a decoding worker reads it.
J2K_IN_THREAD_PIXELS = 1 << 18
# The hint's side of it (the file meta gives no size): a band is at least as long as its contract asks, so under a
# contract asking for more than this only a band narrower than it is long can be that small (a 4400 x 3575 image at 1/8
# under a 520 px contract: 246 k pixels); the hint sends such a file to a worker, a hop more. Below, the header decides.
J2K_IN_THREAD_LONG_SIDE = math.isqrt(J2K_IN_THREAD_PIXELS)


def lets_threads_run(transfer_syntax: str | None, long_side: int) -> bool:
    """Whether the decode planned for ``transfer_syntax`` under a contract of ``long_side`` lets the calling process's
    other threads run while it works: numpy (uncompressed) and imagecodecs (JPEG-LS, RLE, greyscale JPEG:
    ``codec_plugins``) let go of the GIL; OpenJPEG through Pillow (JPEG 2000 and HTJ2K at a reduced size) holds it,
    but only briefly where the contract asks for little (``J2K_IN_THREAD_PIXELS``). pydicom's own plugins, used
    where imagecodecs is not installed, hold it for the whole decode (a full-field JPEG-LS image about 150 ms,
    lossless JPEG through GDCM 230 ms): in a process that also runs an event loop, that loop stops meanwhile.
    Anything not known to let go (another codec, a full-size JPEG 2000 decode by pydicom's plugins, an unknown
    syntax): False. From the syntax alone: ``read_dicom(..., gil_free_only=True)`` holds a decode to it on the
    parsed header (an image no larger than ``long_side`` is a full-size decode; a reduced JPEG 2000 decode of more
    than ``J2K_IN_THREAD_PIXELS`` is not short)."""
    from medvision.codec_plugins import gil_free

    return (transfer_syntax in NATIVE_SYNTAXES
            or (transfer_syntax in J2K_SYNTAXES and 0 < long_side <= J2K_IN_THREAD_LONG_SIDE)
            or gil_free(transfer_syntax))


def short_in_thread(rows: int, columns: int, levels: int) -> bool:
    """Whether a reduced JPEG 2000 decode of a ``rows`` x ``columns`` image, ``levels`` wavelet levels discarded, is
    short enough to hold the GIL in a thread of a process that runs an event loop (``J2K_IN_THREAD_PIXELS``)."""
    r, c = reduced_size(rows, columns, 1 << levels)
    return r * c <= J2K_IN_THREAD_PIXELS


def reduced_size(rows: int, columns: int, factor: int) -> tuple[int, int]:
    return -(-rows // factor), -(-columns // factor)


def _half(x: np.ndarray, axis: int) -> np.ndarray:
    """One reversible 5/3 lifting step along ``axis`` (samples 2k low-pass, 2k+1 high-pass): the low-pass band, in
    ``x``'s own integer type (the caller picks one no intermediate can overflow: ``_fits``). Symmetric extension at
    both ends, and the standard's integer rounding (F.3.8.2):
    d[k] = x[2k+1] - floor((x[2k] + x[2k+2]) / 2);  s[k] = x[2k] + floor((d[k-1] + d[k] + 2) / 4).
    Along rows (``axis`` 1) the even and odd samples are first gathered into contiguous arrays: every operation
    after that runs numpy's vector loops (on strided samples, or on a transposed copy, it took twice as long)."""
    def take(a, s):
        return a[(s, slice(None))] if axis == 0 else a[(slice(None), s)]

    even, odd = take(x, slice(0, None, 2)), take(x, slice(1, None, 2))
    ne, no = even.shape[axis], odd.shape[axis]
    if no == 0:
        return np.array(even)
    if axis == 1:
        even, odd = np.ascontiguousarray(even), np.ascontiguousarray(odd)
    d = np.empty(odd.shape, x.dtype)
    m = ne - 1  # odd samples with a right neighbour; the last one of an even length mirrors x[n-2]
    np.add(take(even, slice(0, m)), take(even, slice(1, None)), out=take(d, slice(0, m)))
    if no > m:
        np.add(take(even, slice(m, m + 1)), take(even, slice(m, m + 1)), out=take(d, slice(m, m + 1)))
    np.right_shift(d, 1, out=d)
    np.subtract(odd, d, out=d)
    s = np.empty(even.shape, x.dtype)
    np.add(take(d, slice(0, 1)), take(d, slice(0, 1)), out=take(s, slice(0, 1)))  # d[-1] mirrors d[0]
    np.add(take(d, slice(0, no - 1)), take(d, slice(1, no)), out=take(s, slice(1, no)))
    if ne > no:  # an odd length: the last even sample's right detail mirrors d[no-1]
        np.add(take(d, slice(no - 1, no)), take(d, slice(no - 1, no)), out=take(s, slice(no, no + 1)))
    s += 2
    np.right_shift(s, 2, out=s)
    s += even
    return s


def _step_range(lo: int, hi: int) -> tuple[int, int, int]:
    """For samples in [lo, hi]: the range of one lifting step's low-pass band, and the largest magnitude any value
    computed on the way takes (the sums of two samples, the details, the sums of two details plus 2)."""
    d_lo, d_hi = lo - hi, hi - lo  # x[2k+1] - floor(mean of two samples)
    s_lo, s_hi = lo + (2 * d_lo + 2) // 4, hi + (2 * d_hi + 2) // 4
    return s_lo, s_hi, max(-2 * lo, 2 * hi, -2 * d_lo, 2 * d_hi + 2, -s_lo, s_hi)


def _fits(lo: int, hi: int) -> np.dtype:
    """The narrowest type one 2-D level on samples in [lo, hi] can run in exactly: int16 where no intermediate of
    either step can leave it (12- and 13-bit mammograms, and the bands of their first levels), else int32."""
    v_lo, v_hi, v_big = _step_range(lo, hi)
    _, _, h_big = _step_range(v_lo, v_hi)
    return np.dtype(np.int16) if max(v_big, h_big) <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _as(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``rows`` in ``dtype``: a free reinterpretation where the bits already mean the same (uint16 samples that all
    fit int16, in the machine's byte order), else a converted copy (one pass, so the lifting runs on one type)."""
    if rows.dtype == dtype:
        return rows
    if rows.dtype.itemsize == dtype.itemsize and rows.dtype.isnative and rows.dtype.kind in "ui":
        return rows.view(dtype)  # the caller checked every sample lies in dtype's range (``_fits``)
    return rows.astype(dtype)


STRIP_ROWS = 64  # output rows computed at once: a strip's intermediates stay in a core's cache


def _level(a: np.ndarray, dtype: np.dtype, checked: bool = False, ready=None) -> np.ndarray | None:
    """One 2-D level (the vertical step, then the horizontal one) in ``dtype``, in strips of ``STRIP_ROWS`` output
    rows, equal to whole-image steps: output row k of the vertical step reads input rows 2k-2 .. 2k+2, so each
    strip is computed from its rows plus two on either side, and the one output row at each side that the strip's
    edge would mirror is dropped (the image's own edges are mirrored as before). On a full-field image: 2x faster
    than whole-image steps.

    ``checked``: each strip's samples are first checked to fit ``dtype`` (``_fits``: a strip's arithmetic depends
    on its own samples only), while the strip is in cache rather than in a pass of its own over the image; None
    when one does not fit (the caller runs the level again, wider). ``ready(rows)``, if given, is called before a
    strip is read: it returns once ``a``'s first ``rows`` rows hold their values (they may still be arriving)."""
    n = a.shape[0]
    half = (n + 1) // 2
    out = np.empty((half, (a.shape[1] + 1) // 2), dtype)
    for k0 in range(0, half, STRIP_ROWS):
        k1 = min(half, k0 + STRIP_ROWS)
        lead = 0 if k0 == 0 else 1
        if ready is not None:
            ready(min(n, 2 * k1 + 2))
        rows = a[2 * k0 - 2 * lead:min(n, 2 * k1 + 2)]
        if checked and _fits(0 if rows.dtype.kind == "u" else int(rows.min()), int(rows.max())) != dtype:
            return None
        out[k0:k1] = _half(_half(_as(rows, dtype), 0)[lead:lead + k1 - k0], 1)
    return out


def lowpass(stored: np.ndarray, levels: int, bits_stored: int, signed: bool, ready=None) -> np.ndarray:
    """The image at 1/2**levels of its size: the low-pass band of ``levels`` 2-D steps of the reversible 5/3
    wavelet, as JPEG 2000 computes it (bit for bit what OpenJPEG gives for a lossless codestream decoded at that
    reduction), clamped to the ``bits_stored`` range and returned in the stored type. Each input value comes from
    memory once (a strip's range check and its steps run while it is in cache); no full-size copy of the input is
    made. Each level runs in the narrowest integer type its samples'
    range allows (``_fits``: int16 for a 12-bit mammogram's levels, half the memory traffic of int32).
    ``ready(rows)``: ``stored`` is still arriving, row after row; called before rows are read, it returns once the
    first ``rows`` are in (``_level``'s)."""
    if levels == 0:
        return stored
    a = stored
    narrow, wide = np.dtype(np.int16), np.dtype(np.int32)
    for level in range(levels):
        arriving = ready if level == 0 else None
        if not a.size:
            a = _level(a, wide)
        elif a.dtype == np.uint8:
            a = _level(a, _fits(0, 255), ready=arriving)
        else:
            narrowed = _level(a, narrow, checked=True, ready=arriving)
            a = narrowed if narrowed is not None else _level(a, wide, ready=arriving)
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    info = np.iinfo(stored.dtype)
    return np.clip(a, max(lo, info.min), min(hi, info.max)).astype(stored.dtype)


def native_view(buffer, transfer_syntax: str, rows: int, columns: int, bits_allocated: int,
                signed: bool) -> np.ndarray | None:
    """The stored values of uncompressed single-frame pixel data as a view of ``buffer`` (bytes or a memory map),
    or None when the layout is one this fast path does not take (the caller decodes the pixels in full then)."""
    if transfer_syntax not in NATIVE_SYNTAXES or bits_allocated not in (8, 16):
        return None
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    if bits_allocated == 16:
        dtype = dtype.newbyteorder(">" if transfer_syntax == BIG_ENDIAN else "<")
    count = rows * columns
    if len(buffer) < count * dtype.itemsize:
        return None
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(rows, columns)


def j2k_levels(codestream: bytes) -> tuple[int, int, bool] | None:
    """``(decomposition levels, precision in bits, signed)`` from a JPEG 2000 codestream's SIZ and COD markers, or
    None when they cannot be read (JP2 wrapper, several components)."""
    b = bytes(codestream[:4096])
    if b[:4] != b"\xff\x4f\xff\x51":
        return None
    siz_length = int.from_bytes(b[4:6], "big")
    components = int.from_bytes(b[40:42], "big")
    if components != 1 or len(b) < 45:
        return None
    ssiz = b[42]
    precision, signed = (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
    i = 4 + siz_length
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker, length = b[i + 1], int.from_bytes(b[i + 2:i + 4], "big")
        if marker == 0x52:  # COD: Scod, SGcod (4 bytes), then SPcod whose first byte is the number of levels
            return b[i + 9], precision, signed
        if marker == 0x90:  # SOT: the main header ended without a COD
            return None
        i += 2 + length
    return None


OPENJPEG_THREADS = "OPJ_NUM_THREADS"  # OpenJPEG reads it each time it opens a codestream


def decode_threads() -> int:
    """The threads one decode may use in this process (``use_decode_threads``): 1 unless set."""
    try:
        return max(1, int(os.environ.get(OPENJPEG_THREADS, "0") or 0))
    except ValueError:
        return 1


def use_decode_threads(threads: int, keep_set: bool = False) -> None:
    """Decode each JPEG 2000 codestream in this process with ``threads`` threads (OpenJPEG decodes code-blocks side
    by side: the same pixels, bit for bit, and about the same CPU), and an RLE frame's segments side by side
    (``codec_plugins``). It pays where a process decodes one image at a
    time with cores to spare: the service's own process (a request alone in it, the review UI's renderings; a
    full-field image at 1/2 in half the time on two cores). A decoding worker, one per core, uses one. Set before the
    process's threads decode (it is an environment variable: ``OPJ_NUM_THREADS``, which spawned children inherit);
    ``keep_set``: leave a value already set (by the user) as it is."""
    current = os.environ.get(OPENJPEG_THREADS)
    if keep_set and current:
        return
    # one thread is OpenJPEG's 0: decoded in the calling thread (its 1 starts a pool thread the caller hands every
    # code-block to and waits on: 5 % slower); unset means the same, and is left unset (no setenv in a process whose
    # other threads may be reading the environment, as a Ray worker's are)
    wanted = str(threads if threads > 1 else 0)
    if current != wanted and not (wanted == "0" and current is None):
        os.environ[OPENJPEG_THREADS] = wanted


# Below this size, or at 1/2, cutting the codestream to the kept resolutions costs about what it saves.
CUT_FROM = 1 << 20


def openjpeg(codestream, levels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(codestream)) as im:
        im.reduce = levels
        im.load()
        return np.asarray(im)


def decode_j2k_reduced(codestream: bytes, levels: int, dtype: np.dtype, ahead=None) -> np.ndarray:
    """The image at 1/2**levels of its size, the finest ``levels`` wavelet levels discarded (OpenJPEG via Pillow;
    Pillow widens samples to 8 or 16 bits, which is undone here). Raises on anything it cannot decode.

    ``ahead``: a callable giving what ``medvision.read_ahead`` decoded while the file arrived (or None), used where
    it was decoded from the very codestream cut here, at the same level."""
    found = j2k_levels(codestream)
    if found is None:
        raise ValueError("JPEG 2000 codestream without readable SIZ / COD markers")
    _, precision, signed = found
    if signed:
        raise ValueError("signed JPEG 2000 samples")
    coarse = coarse_codestream(codestream, levels) if levels >= 2 and len(codestream) >= CUT_FROM else None
    done = ahead() if ahead is not None and coarse is not None else None
    try:
        if done is not None and done.cut is not None and done.levels == levels and done.cut == coarse:
            arr = done.pixels
        else:
            arr = openjpeg(coarse if coarse is not None else codestream, levels)
    except Exception:
        if coarse is None:
            raise
        arr = openjpeg(codestream, levels)  # whatever the cut codestream trips on, the whole one decides
    if arr.ndim != 2:
        raise ValueError(f"decoded shape {arr.shape}")
    container = 8 if arr.dtype == np.uint8 else 16
    if precision < container:
        arr = arr >> (container - precision)
    return arr.astype(dtype, copy=False)
