"""Read an image under its contract while the rest of its file is still arriving.

A full-field JPEG 2000 (or HTJ2K) file read at 1/16 needs its header and the first few tens of kilobytes of its
codestream: the packets of the coarse resolutions come first (``medvision.j2k_prefix``), the megabytes after them
hold the finest levels, never decoded. An uncompressed one's low-pass band is computed in strips of rows, each as
soon as its rows are in. A service receiving such a file can do that work while the rest of the body is on its way,
and hold the pixels when it ends. ``decode_ahead`` does it from bytes as they arrive.

It decides nothing: ``read_dicom(..., ahead=)`` reads the whole file afterwards as it always does (the same parse,
checks and refusals) and takes the pixels read ahead only where they came from the same input: JPEG 2000, the
codestream it cut, byte for byte (the same bytes to the same decoder); uncompressed, the same stored values where
they lie in memory (the caller's buffer, written once, as a body arrives). Anything else (another transfer syntax, a
layout these do not read, a header that does not fit in the first bytes, a body that ends short) gives None, and the
file is read as if nothing had been tried.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pydicom

from medvision.dicom_io import (
    _INTERRUPTS,
    ReadLimits,
    _check_policy,
    _meta,
    _ViewReader,
    codestream_size,
    transfer_syntax_hint,
)
from medvision.j2k_prefix import NeedMore, coarse_codestream
from medvision.resolution import (
    BIG_ENDIAN,
    CUT_FROM,
    J2K_SYNTAXES,
    NATIVE_SYNTAXES,
    j2k_levels,
    lowpass,
    native_view,
    openjpeg,
    plan_decode,
    short_in_thread,
)

HEAD = 64 * 1024  # the first bytes waited for: the header and the start of the codestream (a few kB) fit
MOST = 4 << 20  # bytes waited for at most: beyond, the kept packets are not a small prefix (the read decodes them)
NATIVE_SYNTAXES_IMPLICIT = "1.2.840.10008.1.2"  # Implicit VR Little Endian: no VR in an element's header
_PIXEL_DATA = b"\xe0\x7f\x10\x00"
_ITEM = b"\xfe\xff\x00\xe0"


@dataclass(frozen=True)
class Ahead:
    """Pixels read ahead at ``levels`` wavelet levels fewer: what OpenJPEG gave for ``cut`` (a JPEG 2000 codestream
    cut to its coarse resolutions), or the low-pass band of the stored values at ``stored`` (uncompressed: where
    they lie in memory, ``where``'s key, and the Bits Stored and signedness it was clamped to)."""

    cut: bytes | None
    levels: int
    pixels: np.ndarray
    stored: tuple | None = None

    def band_of(self, stored: np.ndarray, levels: int, bits_stored: int, signed: bool) -> np.ndarray | None:
        """The band, when it was computed from these very stored values at ``levels``, clamped to the same range
        (``bits_stored``, ``signed``: the whole file's header's); else None."""
        same = self.stored == (*where(stored), bits_stored, signed) and levels == self.levels
        return self.pixels if same else None


def where(a: np.ndarray) -> tuple:
    """Where an array's values lie: its memory address, shape, strides and type."""
    return a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str


class Arriving(Protocol):
    """A file's bytes as they arrive into ``view`` (the whole file's buffer, filled from its start, each byte
    written once): ``arriving(n)`` blocks until its first ``n`` bytes are in and returns them all, or None when
    they never will be."""

    view: memoryview

    def __call__(self, n: int) -> memoryview | None: ...


class _Gone(Exception):
    """The body ended (or stalled) before the bytes waited for."""


def decode_ahead(arrived: Arriving, size: int, long_side: int, limits: ReadLimits = ReadLimits()) -> Ahead | None:
    """The pixels a JPEG 2000 or uncompressed file ``size`` bytes long will be read with under a contract of
    ``long_side``, read while it arrives (``Arriving``). None wherever this cannot be done (never a refusal: the
    read of the whole file decides)."""
    try:
        return _ahead(arrived, size, long_side, limits)
    except _INTERRUPTS:
        raise
    except BaseException:  # pydicom, the cut and OpenJPEG raise many types on what the read will refuse by name
        return None


def _ahead(arrived: Arriving, size: int, long_side: int, limits: ReadLimits) -> Ahead | None:
    want = min(size, HEAD)
    while True:  # the header, up to the pixel data element
        view = arrived(want)
        if view is None or transfer_syntax_hint(view) not in J2K_SYNTAXES | NATIVE_SYNTAXES:
            return None
        view = view[:want]  # (more may have arrived: parsed no further than asked)
        reader = _ViewReader(view)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(reader, stop_before_pixels=True)
        at = reader.tell()  # where pydicom stopped: the pixel data element, or the end of what has arrived
        if bytes(view[at:at + 4]) == _PIXEL_DATA:
            break
        if len(view) >= min(size, MOST) or at + 8 <= len(view):
            return None  # (stopped before the end at something else: float pixel data, or no image)
        want = min(size, MOST, 2 * len(view))
    meta = _meta(ds)
    ds.add_new(0x7FE00010, "OB", b"")  # found at ``at``, not read: the policy's other checks are what counts here
    _check_policy(ds, meta, limits)
    plan = plan_decode(meta.transfer_syntax, meta.rows, meta.columns, long_side)
    if plan.method == "lowpass" and meta.transfer_syntax in NATIVE_SYNTAXES:
        return _band_ahead(arrived, ds, meta, plan.factor.bit_length() - 1, at, size)
    if plan.method != "wavelet":
        return None
    want, most = max(len(view), at + 32), min(size, at + MOST)
    while True:  # the codestream's first fragment, up to the end of the kept packets
        view = arrived(min(want, most))
        found = _first_fragment(view, at) if view is not None else None
        if found is None:
            return None
        start, length = found
        codestream = view[start:start + length]
        try:
            if len(codestream) < min(length, 4096):
                raise NeedMore  # the main header, where the levels and the size are read
            levels = _levels(codestream, length, plan.factor, meta)
            if levels is None:
                return None
            cut = coarse_codestream(codestream, levels, size=length)
            break
        except NeedMore:
            if len(view) >= most:
                return None
            want = 2 * len(view)
    return Ahead(cut, levels, openjpeg(cut, levels)) if cut is not None else None


def _band_ahead(arrived: Arriving, ds, meta, levels: int, at: int, size: int) -> Ahead | None:
    """Uncompressed pixel data at ``at`` (as ``dicom_io._native_pixels`` takes it): its low-pass band, each strip
    computed once its rows are in."""
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    if meta.transfer_syntax == BIG_ENDIAN or (meta.signed and meta.bits_stored != allocated):
        return None
    view = arrived(min(size, at + 12))  # the element's header, arrived (what follows in the buffer may be stale)
    if view is None:
        return None
    head = bytes(view[at:at + 12])
    if meta.transfer_syntax == NATIVE_SYNTAXES_IMPLICIT:  # tag, 4-byte length
        (length,), start = struct.unpack_from("<L", head, 4), at + 8
    elif head[4:6] in (b"OB", b"OW"):  # tag, VR, 2 reserved bytes, 4-byte length
        (length,), start = struct.unpack_from("<L", head, 8), at + 12
    else:
        return None
    if length == 0xFFFFFFFF or start + length > size:
        return None
    stored = native_view(arrived.view[start:start + length], meta.transfer_syntax, meta.rows, meta.columns,
                         allocated, meta.signed)
    if stored is None:
        return None
    row_bytes = stored.strides[0]

    def ready(rows: int) -> None:
        if arrived(start + rows * row_bytes) is None:
            raise _Gone

    try:
        band = lowpass(stored, levels, meta.bits_stored, meta.signed, ready=ready)
    except _Gone:
        return None
    return Ahead(None, levels, band, (*where(stored), meta.bits_stored, meta.signed))


def _levels(codestream, length: int, factor: int, meta) -> int | None:
    """The wavelet levels the read will discard from this codestream, where it will cut it (and not refuse the file
    before decoding), else None."""
    found = j2k_levels(codestream)
    if found is None or found[1:] != (meta.bits_stored, meta.signed) or meta.signed:
        return None
    levels = min(factor.bit_length() - 1, found[0])
    if levels < 2 or length < CUT_FROM or codestream_size(meta.transfer_syntax, codestream) != (
            meta.rows, meta.columns) or not short_in_thread(meta.rows, meta.columns, levels):
        return None  # (a longer decode would hold the GIL beside the event loop: the read goes to a worker)
    return levels


def _first_fragment(view, at: int) -> tuple[int, int] | None:
    """``(start, declared length)`` of the first fragment of the encapsulated pixel data element at ``at`` (explicit
    VR: tag, VR, 2 reserved bytes, undefined length; then a Basic Offset Table, empty or one frame at 0), or None."""
    head = bytes(view[at:at + 12 + 8 + 4 + 8])
    if len(head) < 28 or head[4:6] not in (b"OB", b"OW") or head[8:12] != b"\xff\xff\xff\xff":
        return None
    if head[12:16] != _ITEM:
        return None
    (table,) = struct.unpack_from("<L", head, 16)
    if table not in (0, 4) or (table == 4 and head[20:24] != bytes(4)):
        return None
    item = at + 12 + 8 + table
    fragment = bytes(view[item:item + 8])
    if len(fragment) < 8 or fragment[:4] != _ITEM:
        return None
    (length,) = struct.unpack_from("<L", fragment, 4)
    return item + 8, length
