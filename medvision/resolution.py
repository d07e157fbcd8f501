"""Decode only the pixels the model sees: the resolution plan, and the reduced decoders that carry it out.

A model looks at a few hundred pixels; a full-field mammogram has 8.5 million. The preprocessing contract
(``PreprocessConfig.decode_long_side``) states the long side the crop and resize need; ``plan_decode`` picks the
coarsest power-of-two reduction of the image that still has it, from the header alone:

- JPEG 2000 and HTJ2K: the finest wavelet levels are discarded (OpenJPEG through Pillow), so their code-blocks
  are never entropy-decoded: most of the work. A codestream with fewer levels than asked is decoded at its
  coarsest level and block-averaged the rest of the way.
- Uncompressed: block means computed straight from the file's pixel bytes (a memory map, or a view of the
  request's buffer), with no full-size copy.
- RLE, JPEG-LS and JPEG: no resolution scalability, so a full decode, then the same block means.

Either way the image arrives at 1/factor of its size (``ceil`` of each side), in its stored integer values,
before any LUT: the grey-scale pipeline and the geometry run on it unchanged. What was done is recorded as the
plan's text (``"1/8 wavelet"``, ``"1/8 area"``, ``"full"``), in ``DicomMeta.decode`` and every score row.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                          "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass(frozen=True)
class DecodePlan:
    """How one image is decoded: at 1/``factor`` of its size, by ``method``; ``note`` says why a plan changed."""

    factor: int = 1
    method: str = "full"  # "full", "wavelet" (JPEG 2000 levels discarded) or "area" (block means)
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
    return DecodePlan(factor, "wavelet" if transfer_syntax in J2K_SYNTAXES else "area")


def reduced_size(rows: int, columns: int, factor: int) -> tuple[int, int]:
    return -(-rows // factor), -(-columns // factor)


def area_downsample(stored: np.ndarray, factor: int) -> np.ndarray:
    """Block means over ``factor`` x ``factor`` blocks (the last row / column of blocks may be narrower),
    rounded back to the stored integer type. Sums are taken over strided views: no full-size copy is made, and
    each input value is read once."""
    if factor == 1:
        return stored
    h, w = stored.shape
    small = stored.dtype.kind == "u" and stored.dtype.itemsize <= 2 and factor <= 128
    wide = np.uint32 if small else np.int64 if stored.dtype.kind == "i" else np.float64 if stored.dtype.kind == "f" \
        else np.uint64  # 128 x 128 sixteen-bit values still fit 32 bits
    cols = np.empty((h, -(-w // factor)), dtype=wide)
    whole = w // factor
    np.copyto(cols[:, :whole], stored[:, 0:whole * factor:factor], casting="unsafe")
    for j in range(1, factor):
        cols[:, :whole] += stored[:, j:whole * factor:factor]
    if whole < cols.shape[1]:  # the last, narrower column of blocks
        cols[:, whole] = stored[:, whole * factor:].sum(axis=1, dtype=wide)
    full_rows = h // factor
    out = np.empty((-(-h // factor), cols.shape[1]), dtype=wide)
    np.copyto(out[:full_rows], cols[0:full_rows * factor:factor], casting="unsafe")
    for i in range(1, factor):
        out[:full_rows] += cols[i:full_rows * factor:factor]
    if full_rows < out.shape[0]:
        out[full_rows] = cols[full_rows * factor:].sum(axis=0, dtype=wide)
    counts_r = np.full(out.shape[0], factor, np.float64)
    counts_c = np.full(out.shape[1], factor, np.float64)
    counts_r[full_rows:] = h - full_rows * factor
    counts_c[whole:] = w - whole * factor
    means = out / counts_r[:, None] / counts_c[None, :]
    if stored.dtype.kind == "f":
        return means.astype(stored.dtype)
    info = np.iinfo(stored.dtype)
    return np.clip(np.rint(means), info.min, info.max).astype(stored.dtype)


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


def decode_j2k_reduced(codestream: bytes, levels: int, dtype: np.dtype) -> np.ndarray:
    """The image at 1/2**levels of its size, the finest ``levels`` wavelet levels discarded (OpenJPEG via Pillow;
    Pillow widens samples to 8 or 16 bits, which is undone here). Raises on anything it cannot decode."""
    from PIL import Image

    found = j2k_levels(codestream)
    if found is None:
        raise ValueError("JPEG 2000 codestream without readable SIZ / COD markers")
    _, precision, signed = found
    if signed:
        raise ValueError("signed JPEG 2000 samples")
    with Image.open(io.BytesIO(codestream)) as im:
        im.reduce = levels
        im.load()
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"decoded shape {arr.shape}")
    container = 8 if arr.dtype == np.uint8 else 16
    if precision < container:
        arr = arr >> (container - precision)
    return arr.astype(dtype, copy=False)
