"""Reading DICOM: one narrow function, ``read_dicom``, and its refusal policy.

``read_dicom`` returns the *stored* pixel values and a ``DicomMeta`` carrying exactly what the
grey-scale pipeline needs (rescale, VOI, photometric) plus UIDs and view information. It never
carries patient identifiers (name, ID, birth date, accession number), so ``meta`` may be logged.

Policy (documented in the README):
- Only single-frame greyscale (MONOCHROME1/2) images are accepted; colour and multi-frame objects
  are refused with ``UnsupportedImageError``.
- "FOR PROCESSING" mammograms are refused: models here are trained on "FOR PRESENTATION" images.
- Objects without pixel data (SR, RT, presentation states, ...) raise ``NotAnImageError``.
- Declared sizes above ``ReadLimits`` are refused *before* decoding (decompression bombs).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medvision import codec_plugins
from medvision.drift import age_band
from medvision.errors import (
    CorruptDicomError,
    EmptyInputError,
    MedvisionError,
    MissingCodecError,
    NotAnImageError,
    NotDicomError,
    UnsupportedImageError,
)
from medvision.resolution import (
    NATIVE_SYNTAXES,
    DecodePlan,
    decode_j2k_reduced,
    j2k_levels,
    lets_threads_run,
    lowpass,
    native_view,
    plan_decode,
    reduced_size,
    short_in_thread,
)

# JPEG syntaxes that pydicom can hand to pillow, which decodes only 8-bit samples.
_PILLOW_8_BIT_ONLY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


# The transfer syntaxes read_dicom decodes with the plugins medvision installs. A DICOM node accepts exactly these, as
# sent.
READABLE_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (8 and 12-bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

# Never swallowed by the "any decoder failure is a domain error" handlers below.
_INTERRUPTS = (KeyboardInterrupt, SystemExit, GeneratorExit)

# Magic numbers of files people upload by mistake, to name them in the error.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive",
    b"GIF8": "a GIF image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
}

# What to install for each compressed transfer syntax family (all permissively licensed).
_CODEC_HINTS = {
    "1.2.840.10008.1.2.4.50": "imagecodecs (or pillow or python-gdcm)",
    "1.2.840.10008.1.2.4.51": "imagecodecs (or pylibjpeg-libjpeg, GPL-3.0, for 12-bit samples)",
    "1.2.840.10008.1.2.4.57": "imagecodecs (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": "imagecodecs (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": "imagecodecs (or pyjpegls)",
    "1.2.840.10008.1.2.4.81": "imagecodecs (or pyjpegls)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg (>= 2.4, HTJ2K)",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg (>= 2.4, HTJ2K)",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg (>= 2.4, HTJ2K)",
    "1.2.840.10008.1.2.5": "imagecodecs (or pylibjpeg pylibjpeg-rle, or numpy for pydicom's own RLE decoder)",
}


@dataclass(frozen=True)
class ReadLimits:
    """Refuse images whose *declared* size exceeds these, before any pixel is decoded."""

    max_pixels: int = 80_000_000  # rows x columns x frames x samples; a 4096 x 5120 mammogram is 21 M
    max_rows: int = 16_384
    max_columns: int = 16_384


@dataclass(frozen=True)
class Lut:
    """The first item of a Modality or VOI LUT Sequence, decoded to numbers by pydicom.

    ``table[i]`` is the output for input value ``first_mapped + i``; inputs outside clamp to the ends.
    """

    first_mapped: int
    bits: int
    table: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class DicomMeta:
    """What downstream code may know about an image. No patient identifiers, by construction."""

    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_class: str
    modality: str | None
    transfer_syntax: str
    photometric: str
    rows: int
    columns: int
    bits_stored: int
    signed: bool
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_centers: tuple[float, ...] = ()
    window_widths: tuple[float, ...] = ()
    voi_lut_function: str = "LINEAR"
    voi_lut: Lut | None = None
    modality_lut: Lut | None = None
    presentation_lut_shape: str | None = None
    laterality: str | None = None
    view: str | None = None
    manufacturer: str | None = None
    model_name: str | None = None
    age_band: str | None = None  # from Patient's Age, a band (``drift.age_band``): never the age itself
    presentation_intent: str | None = None
    decode: str = "full"  # the resolution plan carried out (``medvision.resolution``), e.g. "1/8 wavelet"
    decode_factor: int = 1  # the pixels are at 1/decode_factor of rows x columns

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("voi_lut", "modality_lut"):
            d[f"has_{key}"] = d.pop(key) is not None
        return d


Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
_BUFFERS = (bytes, bytearray, memoryview)


class _ViewReader(io.RawIOBase):
    """A seekable, read-only file over a memory buffer without copying it (``io.BytesIO`` copies a memoryview): a
    request body in shared memory is parsed where it lies, and uncompressed pixels are viewed, never copied."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = bytes(self._view[self._pos:end])
        self._pos = max(self._pos, end)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class DecodeElsewhere(Exception):
    """``read_dicom(..., gil_free_only=True)`` came to a decoder that holds the GIL: the caller decodes the file in
    another process instead (nothing was decoded, nothing refused; never an answer to anyone)."""


def read_dicom(source: Source, limits: ReadLimits = ReadLimits(),
               identifiers: dict[str, str] | None = None, long_side: int = 0,
               gil_free_only: bool = False, ahead=None) -> tuple[np.ndarray, DicomMeta]:
    """Read one greyscale DICOM image.

    Args:
        source: a path, the file's bytes, or a binary file object.
        limits: declared-size limits checked before decoding.
        identifiers: if given, receives the exam's ``AccessionNumber`` ("" when absent) from the same parse:
            the key readers search results by, kept out of ``DicomMeta`` on purpose; store it, never log it.
        long_side: the long side, in pixels, the caller needs (``PreprocessConfig.decode_long_side``): the image
            is decoded at the coarsest power-of-two reduction that keeps it (``medvision.resolution``); 0 decodes
            every pixel. ``meta.decode`` says what was done.
        gil_free_only: decode only with what lets the process's other threads run meanwhile (numpy for uncompressed
            pixels, imagecodecs, OpenJPEG through Pillow for a short reduced JPEG 2000 decode:
            ``resolution.short_in_thread``); where the file needs another decoder or a longer decode
            (``resolution.lets_threads_run``'s, decided here on what the header says, not on a hint), raise
            ``DecodeElsewhere`` before it runs.
        ahead: what ``medvision.read_ahead.decode_ahead`` read of this file while it arrived, as a callable that
            gives it (blocking until it is done): taken in place of the reduced JPEG 2000 decode where it was made
            from the same cut codestream, or of an uncompressed image's band where it was computed from the same
            stored values in memory, clamped alike; everything else is read and checked as without it.

    Returns:
        ``(pixels, meta)``: the stored values as a 2-D integer array (no LUT applied) and the meta.

    Raises:
        EmptyInputError, NotDicomError, NotAnImageError, CorruptDicomError, UnsupportedImageError,
        MissingCodecError: each with a message naming the problem.
    """
    ds = _parse(source, limits=limits, defer_pixels=isinstance(source, (str, os.PathLike, *_BUFFERS)))
    try:
        meta = _meta(ds)
        _check_policy(ds, meta, limits)
        plan = plan_decode(meta.transfer_syntax, meta.rows, meta.columns, long_side)
        pixels, plan = _decode_planned(ds, meta, plan, source, gil_free_only, ahead)
        if plan.factor != 1:
            meta = replace(meta, decode=str(plan), decode_factor=plan.factor)
        if identifiers is not None:
            identifiers["AccessionNumber"] = str(ds.get("AccessionNumber", "") or "")
    except (MedvisionError, DecodeElsewhere, *_INTERRUPTS):
        raise
    except BaseException as exc:  # a malformed value pydicom parses lazily (e.g. an IS of '1A'): never a crash
        raise CorruptDicomError(f"malformed DICOM attribute ({type(exc).__name__}): {exc}") from None
    return pixels, meta


HINT_BYTES = 65536  # where ``transfer_syntax_hint`` looks
_HINT_ELEMENTS = 64  # file meta elements it reads at most (a real file meta has about ten)
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def transfer_syntax_hint(data) -> str | None:
    """The Transfer Syntax UID of a DICOM file's bytes, read from its file meta (group 0002, always Explicit VR
    Little Endian: PS3.10 7.1) without parsing the dataset: a hint for where to decode it, taken in microseconds
    (``read_dicom`` parses and checks it all). None without the DICM marker, or when it is not in the first
    ``HINT_BYTES``."""
    view = memoryview(data).cast("B")[:HINT_BYTES]
    if bytes(view[128:132]) != b"DICM":
        return None
    at = 132
    for _ in range(_HINT_ELEMENTS):
        if at + 8 > len(view):
            return None
        group, element = struct.unpack_from("<HH", view, at)
        if group != 0x0002:
            return None
        if bytes(view[at + 4:at + 6]) in _LONG_LENGTH_VRS:
            length, start = (struct.unpack_from("<L", view, at + 8)[0] if at + 12 <= len(view) else 0), at + 12
        else:
            length, start = struct.unpack_from("<H", view, at + 6)[0], at + 8
        if element == 0x0010:
            return bytes(view[start:start + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        at = start + length
    return None


def decodes_without_gil(data, long_side: int) -> bool:
    """Whether a DICOM file's bytes (its first ``HINT_BYTES`` will do) look like a decode that lets the process's
    other threads run (``resolution.lets_threads_run`` of ``transfer_syntax_hint``): a hint, taken in microseconds,
    of where to decode it. ``read_dicom(..., gil_free_only=True)`` holds the decode to it whatever the hint said."""
    return lets_threads_run(transfer_syntax_hint(data), long_side)


def read_header(source: str | os.PathLike | bytes, limits: ReadLimits = ReadLimits()) -> tuple[Dataset, DicomMeta]:
    """Read the attributes only (pixel data deferred, never decoded) and apply the same refusal policy.

    Used by the scanner to index large trees quickly. Returns the pydicom ``Dataset`` too, so the
    caller can read what ``DicomMeta`` deliberately omits (patient ID for splits, age for data cards);
    callers must not log it. Uncompressed pixel data shorter than declared is reported as truncated;
    compressed pixel data is only checked when it is decoded by ``read_dicom``.
    """
    ds = _parse(source, headers_only=True, limits=limits)
    try:
        meta = _meta(ds)
        _check_policy(ds, meta, limits)
        _check_native_length(ds, meta, source)
    except (MedvisionError, *_INTERRUPTS):
        raise
    except BaseException as exc:
        raise CorruptDicomError(f"malformed DICOM attribute ({type(exc).__name__}): {exc}") from None
    return ds, meta


def _check_native_length(ds: Dataset, meta: DicomMeta, source) -> None:
    elem = ds.get_item("PixelData", keep_deferred=True)
    if elem is None or meta.transfer_syntax not in NATIVE_SYNTAXES or not isinstance(source, (str, os.PathLike)):
        return
    tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return
    expected = meta.rows * meta.columns * int(ds.get("BitsAllocated", 16) or 16) // 8
    if length < expected:
        raise CorruptDicomError(f"pixel data holds {length:,} bytes, {expected:,} expected for the declared image")
    if tell + length > os.path.getsize(source):
        raise CorruptDicomError(
            f"truncated DICOM file: pixel data declares {length:,} bytes but the file ends "
            f"{tell + length - os.path.getsize(source):,} bytes early"
        )


_DEFLATED = b"1.2.840.10008.1.2.1.99"


def _check_deflate(fileobj: BinaryIO, head: bytes, limits: ReadLimits) -> None:
    """Refuse a deflated dataset that would inflate beyond the limits (pydicom inflates it whole in memory)."""
    if _DEFLATED not in head:
        return
    fileobj.seek(0)
    start = fileobj.read(1024)
    fileobj.seek(0)
    if start[128:132] != b"DICM" or start[132:136] != b"\x02\x00\x00\x00" or start[136:138] != b"UL":
        return  # no group length to find the deflated part; pydicom will reject what it cannot parse
    meta_end = 144 + int.from_bytes(start[140:144], "little")
    budget = limits.max_pixels * 4 + (64 << 20)  # room for 32-bit pixels plus attributes
    fileobj.seek(meta_end)
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while chunk := fileobj.read(1 << 20):
            while chunk:
                total += len(inflater.decompress(chunk, budget - total + 1))
                if total > budget:
                    raise UnsupportedImageError(
                        f"the deflated dataset inflates to more than {budget:,} bytes: refused (decompression bomb?)"
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise CorruptDicomError(f"deflated dataset is corrupt: {exc}") from None
    finally:
        fileobj.seek(0)


def _parse(source: Source, headers_only: bool = False, limits: ReadLimits = ReadLimits(),
           defer_pixels: bool = False) -> Dataset:
    """The dataset, refused by name when it is no DICOM or is truncated. Pixel data is read now unless
    ``headers_only`` or ``defer_pixels`` (then ``_load_pixel_data``, or a view of the bytes, reads it later)."""
    if isinstance(source, _BUFFERS):
        if not len(source):
            raise EmptyInputError("empty input: expected a DICOM file, got 0 bytes")
        fileobj: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else _ViewReader(memoryview(source))
        name = "the input"
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise NotDicomError(f"no such file: {name}")
        if os.path.getsize(name) == 0:
            raise EmptyInputError(f"empty file: {name}")
        fileobj = open(name, "rb")  # noqa: SIM115 - closed below
    else:
        fileobj, name = source, str(getattr(source, "name", "the input stream"))
    try:
        head = fileobj.read(1024)
        fileobj.seek(0)
        has_marker = head[128:132] == b"DICM"
        _check_deflate(fileobj, head, limits)
        # The 128-byte preamble may legitimately hold a TIFF header (dual-format files): only name
        # other formats when the DICM marker is absent.
        for magic, what in _SIGNATURES.items():
            if not has_marker and head.startswith(magic):
                raise NotDicomError(f"not a DICOM file: {name} looks like {what}")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # Deferred values are re-read from the path (or the bytes) when touched: never from a caller's stream.
                defer = 4096 if (headers_only and isinstance(source, (str, os.PathLike))) or defer_pixels else None
                ds = pydicom.dcmread(fileobj, force=not has_marker, defer_size=defer)
        except InvalidDicomError as exc:
            raise NotDicomError(f"not a DICOM file: {exc}") from None
        except Exception as exc:  # pydicom raises many types on malformed input
            if not has_marker:
                raise NotDicomError(
                    "not a DICOM file: no 'DICM' marker at byte 128 and the bytes do not parse as a dataset"
                ) from None
            raise CorruptDicomError(f"malformed DICOM ({type(exc).__name__}): {exc}") from None
        truncated = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
        if truncated:
            raise CorruptDicomError(f"truncated DICOM file: {truncated[0]}")
        if not has_marker and not _looks_like_dataset(ds):
            raise NotDicomError("not a DICOM file: no 'DICM' marker at byte 128 and no DICOM attributes found")
        if len(ds) == 0:
            raise CorruptDicomError("no data elements could be read after the file meta: truncated or malformed")
        if not headers_only and not defer_pixels:
            _load_pixel_data(ds)
        return ds
    finally:
        if isinstance(source, (str, os.PathLike)):
            fileobj.close()


def _load_pixel_data(ds: Dataset) -> None:
    """Read deferred pixel data now; a file that ends inside it is refused by name."""
    try:
        if "PixelData" in ds:
            ds.PixelData  # noqa: B018 - force the deferred read
    except Exception as exc:
        raise CorruptDicomError(f"truncated or malformed pixel data: {exc}") from None


def _looks_like_dataset(ds: Dataset) -> bool:
    try:
        return any(k in ds for k in ("SOPClassUID", "PixelData", "StudyInstanceUID", "Rows"))
    except Exception:
        return False


def _first(value, cast=float) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(cast(v) for v in value)
    return (cast(value),)


def _view(ds: Dataset) -> str | None:
    position = str(ds.get("ViewPosition", "") or "").upper()
    if position in {"CC", "MLO", "ML", "LM", "XCC", "XCCL", "XCCM", "AP", "PA", "LL", "RL"}:
        return position
    seq = ds.get("ViewCodeSequence")
    if seq:
        meaning = str(seq[0].get("CodeMeaning", "")).lower()
        if "cranio-caudal" in meaning:
            return "CC"
        if "medio-lateral oblique" in meaning:
            return "MLO"
        if "medio-lateral" in meaning:
            return "ML"
    return None


def _meta(ds: Dataset) -> DicomMeta:
    try:
        tsyntax = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.get("file_meta", {}) else ""
        if not tsyntax:
            tsyntax = "1.2.840.10008.1.2" if ds.is_implicit_VR else "1.2.840.10008.1.2.1"
        sop_class = ds.get("SOPClassUID")
        return DicomMeta(
            sop_instance_uid=_str(ds.get("SOPInstanceUID")),
            study_instance_uid=_str(ds.get("StudyInstanceUID")),
            series_instance_uid=_str(ds.get("SeriesInstanceUID")),
            sop_class=sop_class.name if sop_class is not None else "unknown",
            modality=_str(ds.get("Modality")),
            transfer_syntax=tsyntax,
            photometric=str(ds.get("PhotometricInterpretation", "") or "").strip(),
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
            signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
            rescale_slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
            rescale_intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            window_centers=_first(ds.get("WindowCenter")),
            window_widths=_first(ds.get("WindowWidth")),
            voi_lut_function=str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper(),
            voi_lut=_lut(ds, "VOILUTSequence"),
            modality_lut=_lut(ds, "ModalityLUTSequence"),
            presentation_lut_shape=_str(ds.get("PresentationLUTShape")),
            laterality=_str(ds.get("ImageLaterality") or ds.get("Laterality")),
            view=_view(ds),
            manufacturer=_str(ds.get("Manufacturer")),
            model_name=_str(ds.get("ManufacturerModelName")),
            age_band=age_band(_str(ds.get("PatientAge"))),
            presentation_intent=_str(ds.get("PresentationIntentType")),
        )
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise CorruptDicomError(f"malformed image attributes ({type(exc).__name__}): {exc}") from None


def _lut(ds: Dataset, sequence: str) -> Lut | None:
    """Decode the first LUT of ``sequence`` by mapping an input ramp through pydicom's own LUT code.

    pydicom already handles the descriptor's pitfalls (0 entries meaning 65536, a signed first value
    stored as US, 8-bit data in 16-bit words, OW vs US/SS), so medvision reuses it instead of repeating it.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    items = ds.get(sequence)
    if not items or "LUTDescriptor" not in items[0] or "LUTData" not in items[0]:
        return None
    desc = items[0].LUTDescriptor
    entries = int(desc[0]) or 65536
    first = int(desc[1])
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and first > 32767:
        first -= 65536
    ramp = np.arange(first, first + entries, dtype=np.int64)
    if sequence == "ModalityLUTSequence":
        table = apply_modality_lut(ramp, ds)
    else:
        table = apply_voi_lut(ramp, ds, index=0, prefer_lut=True)
    return Lut(first_mapped=first, bits=int(desc[2]), table=np.asarray(table, dtype=np.float32).ravel())


def _str(value) -> str | None:
    return None if value in (None, "") else str(value)


def _check_policy(ds: Dataset, meta: DicomMeta, limits: ReadLimits) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "Rows" in ds or "Image Storage" in meta.sop_class:
            raise CorruptDicomError(
                f"a '{meta.sop_class}' object without pixel data: the file is truncated or incomplete"
            )
        raise NotAnImageError(f"not an image: a '{meta.sop_class}' object has no pixel data")
    if "PixelData" not in ds:
        raise UnsupportedImageError("float pixel data (parametric maps) is not supported")
    if meta.rows <= 0 or meta.columns <= 0:
        raise CorruptDicomError("image declares no Rows / Columns")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if meta.rows > limits.max_rows or meta.columns > limits.max_columns:
        raise UnsupportedImageError(
            f"image of {meta.rows} x {meta.columns} exceeds the limit of {limits.max_rows} x {limits.max_columns}"
        )
    declared = meta.rows * meta.columns * frames * samples
    if declared > limits.max_pixels:
        raise UnsupportedImageError(
            f"declared size {meta.rows} x {meta.columns} x {frames} frames x {samples} samples = {declared:,} "
            f"values exceeds the limit of {limits.max_pixels:,}"
        )
    if samples != 1 or meta.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            f"colour images are refused (Photometric Interpretation {meta.photometric or 'missing'}, "
            f"{samples} samples per pixel): medvision scores greyscale radiographs only"
        )
    if frames != 1:
        raise UnsupportedImageError(
            f"multi-frame images are refused ({frames} frames): send one frame per instance "
            "(e.g. a 2-D mammogram, not a tomosynthesis stack)"
        )
    if (meta.presentation_intent or "").upper() == "FOR PROCESSING":
        raise UnsupportedImageError(
            "'FOR PROCESSING' (raw detector) images are refused: send the 'FOR PRESENTATION' image"
        )


_J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                 "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                 "1.2.840.10008.1.2.4.203"}
_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                  "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_JPEG_LS_SYNTAXES = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
# Start-of-frame markers of ISO 10918-1 (all processes) and SOF55 of JPEG-LS (ISO 14495-1).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def codestream_size(transfer_syntax: str, codestream: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` declared inside a JPEG / JPEG-LS / JPEG 2000 codestream, or None if unknown.

    The codec allocates what the *codestream* declares, whatever the DICOM header says: a 64 x 64
    header around a 60000 x 60000 codestream is a decompression bomb. Read the size before decoding.
    """
    b = bytes(codestream[:65536])
    try:
        if transfer_syntax in _J2K_SYNTAXES:
            off = 0
            if b.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2 wrapper: find the contiguous codestream box
                off = 12
                while off + 8 <= len(b) and b[off + 4:off + 8] != b"jp2c":
                    length = int.from_bytes(b[off:off + 4], "big")
                    if length < 8:
                        return None
                    off += length
                off += 8
            if b[off:off + 4] != b"\xff\x4f\xff\x51":  # SOC then SIZ
                return None
            x, y, xo, yo = (int.from_bytes(b[off + 8 + 4 * i:off + 12 + 4 * i], "big") for i in range(4))
            return y - yo, x - xo
        if transfer_syntax in _JPEG_SYNTAXES:
            frame = jpeg_frame_header(b)
            return None if frame is None else (frame[1], frame[2])
    except (IndexError, ValueError):
        return None
    return None


HEADER_BYTES = 65536  # of a codestream, where its header is looked for
# Lossless JPEG: GDCM decodes it where imagecodecs is not installed (pylibjpeg-libjpeg, GPL, is not a dependency)
_LOSSLESS_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
# The frame header (SOFn) each JPEG syntax carries (PS3.5 8.2.1-8.2.4, 10.2-10.4): sequential DCT with Huffman coding
# (processes 1, 2 and 4; an extended frame under the baseline syntax is read as libjpeg reads it), lossless with
# Huffman coding (process 14), JPEG-LS (SOF55). Progressive, arithmetic and hierarchical frames are none of them: a
# progressive stream can repeat a pass over the whole image once per 11-byte scan, for as long as its bytes last.
_FRAME_MARKERS = {"1.2.840.10008.1.2.4.50": (0xC0, 0xC1), "1.2.840.10008.1.2.4.51": (0xC0, 0xC1),
                  "1.2.840.10008.1.2.4.57": (0xC3,), "1.2.840.10008.1.2.4.70": (0xC3,),
                  "1.2.840.10008.1.2.4.80": (0xF7,), "1.2.840.10008.1.2.4.81": (0xF7,)}


def _jpeg_header(codestream) -> tuple[bytes, list[tuple[int, int | None]]]:
    """A JPEG or JPEG-LS codestream's first ``HEADER_BYTES`` and its header's markers from the start of image:
    ``(offset, marker)`` in order, to the start of scan (included) or the end of those bytes, read as libjpeg reads
    them: bytes that are neither a marker nor fill are passed over to the next marker (listed as ``(offset, None)``,
    once per run of such bytes). No markers without a start-of-image marker."""
    b = bytes(codestream[:HEADER_BYTES])
    markers: list[tuple[int, int | None]] = []
    i = 2 if b.startswith(b"\xff\xd8") else len(b)
    while i + 4 <= len(b):
        if b[i] != 0xFF or b[i + 1] == 0x00:  # stray bytes (0xFF 0x00 is no marker either): on to the next marker
            markers.append((i, None))
            i = b.find(b"\xff", i + 1)
            while 0 <= i < len(b) - 1 and b[i + 1] == 0x00:
                i = b.find(b"\xff", i + 2)
            if i < 0:
                break
            continue
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        markers.append((i, marker))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        i += 2 if 0xD0 <= marker <= 0xD9 or marker == 0x01 else 2 + int.from_bytes(b[i + 2:i + 4], "big")
    return b, markers


def _jpeg_frame(codestream) -> tuple[int, int, int, int, int] | None:
    """``(marker, precision, rows, columns, components)`` of a JPEG or JPEG-LS codestream's first frame header
    (SOFn, SOF55), or None when there is none in its first ``HEADER_BYTES``."""
    b, markers = _jpeg_header(codestream)
    for i, marker in markers:
        if marker in _SOF_MARKERS and i + 10 <= len(b):
            return (marker, b[i + 4], int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big"),
                    b[i + 9])
    return None


def jpeg_frame_header(codestream) -> tuple[int, int, int, int] | None:
    """``(precision, rows, columns, components)`` of a JPEG or JPEG-LS codestream's frame header (SOFn, SOF55), or
    None when there is none in its first 64 kB."""
    frame = _jpeg_frame(codestream)
    return None if frame is None else frame[1:]


def _stray_header_bytes(codestream) -> int | None:
    """Where a JPEG codestream's header (start-of-image to start-of-scan) holds a byte that is neither a marker nor
    fill, or None (a header that runs past the first 64 kB is not judged)."""
    return next((i for i, marker in _jpeg_header(codestream)[1] if marker is None), None)


def _fragments(pixel_data):
    """The fragments of encapsulated pixel data (PS3.5 A.4: a Basic Offset Table item, then one item per fragment,
    then a sequence delimiter), one at a time, as views of ``pixel_data`` (bytes, or a view of the file or the
    request's buffer): nothing is copied, and nothing is kept per fragment (a hostile stream of millions of empty
    items costs time, as in pydicom, not memory). Read as pydicom's ``generate_fragments`` reads them (the same
    leniency, the same refusals: ValueError for an unexpected tag, an item of undefined length or one whose length
    is cut off)."""
    view = memoryview(pixel_data).cast("B")
    at, first = 0, True
    while at + 4 <= len(view):  # pydicom's value of the element ends before the delimiter; a view of the file holds it
        group, element = struct.unpack_from("<HH", view, at)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError(f"unexpected tag ({group:04X},{element:04X}) at byte {at} where an item belongs")
        if at + 8 > len(view):
            raise ValueError(f"the data ends inside the length of the item at byte {at} (truncated)")
        (length,) = struct.unpack_from("<L", view, at + 4)
        if length == 0xFFFFFFFF:
            raise ValueError(f"an item of undefined length at byte {at}")
        if not first:  # the first item is the Basic Offset Table
            yield view[at + 8:at + 8 + length]  # a fragment cut short by the end of the data is read as it is
        at, first = at + 8 + length, False


def _encapsulated(ds: Dataset, source):
    """The image's encapsulated pixel data, where it lies in the caller's bytes or file when the parse left it
    unread (a full-field JPEG 2000 body is then never copied before its decoder reads it), else the dataset's own."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    value = getattr(elem, "value", None) if elem is not None else None
    tell = getattr(elem, "value_tell", None)
    if value is None and tell is not None:
        length = getattr(elem, "length", None)
        undefined = length in (None, 0xFFFFFFFF)
        view = _source_view(source, tell, None if undefined else length)
        if view is not None and not undefined:
            return view
        end = _delimiter_at(view) if view is not None else None
        if end is not None:
            return view[:end]
    _load_pixel_data(ds)  # irregular items: pydicom's own reading decides where the value ends
    return ds.PixelData


def _delimiter_at(view) -> int | None:
    """Where undefined-length pixel data ends, found as pydicom's parse finds it first: items walked to an aligned
    sequence delimiter. None when the walk fails (pydicom then scans the bytes for the delimiter instead, and its
    value, not this view, is used)."""
    at = 0
    while at + 8 <= len(view):
        group, element, length = struct.unpack_from("<HHL", view, at)
        if (group, element) == (0xFFFE, 0xE0DD):
            return at
        if (group, element) != (0xFFFE, 0xE000):
            return None
        at += 8 + length
    return None


def _codestream(pixel_data):
    """One frame's codestream: its only fragment, as it lies, or its fragments joined. Only where the Basic
    Offset Table is empty or says one frame starting at 0; anything else (ValueError) is left to pydicom's full
    decode, which reads the table."""
    table = memoryview(pixel_data).cast("B")[:12]
    if len(table) >= 8:
        group, element, length = struct.unpack_from("<HHL", table)
        offsets = bytes(table[8:12])
        if (group, element) != (0xFFFE, 0xE000) or length not in (0, 4) or (length == 4 and offsets != bytes(4)):
            raise ValueError("a Basic Offset Table other than none or one frame at 0")
    fragments = _fragments(pixel_data)
    first = next(fragments, None)
    second = next(fragments, None)
    if first is None or second is None:
        return first
    joined = bytearray(first)
    joined += second
    for fragment in fragments:
        joined += fragment
    return joined


def _check_codestream(ds: Dataset, meta: DicomMeta, pixel_data) -> bytes:
    """Refuse what a codec would choke on before it runs: GDCM, the fallback JPEG decoder, aborts the whole
    process (an uncatchable C++ exception) on e.g. 32-bit samples declared for a JPEG stream. Returns the
    codestream's first ``HEADER_BYTES`` (across fragments)."""
    if meta.transfer_syntax not in _J2K_SYNTAXES | _JPEG_SYNTAXES:
        return b""
    name = pydicom.uid.UID(meta.transfer_syntax).name
    if meta.transfer_syntax in _JPEG_SYNTAXES:  # PS3.5 8.2.1 and 8.2.3: 8 or 16 bits allocated, baseline 8
        allocated = ds.get("BitsAllocated")
        allowed = (8,) if meta.transfer_syntax == "1.2.840.10008.1.2.4.50" else (8, 16)
        if allocated not in allowed or not 1 <= meta.bits_stored <= allocated:
            raise CorruptDicomError(
                f"{name} carries {' or '.join(map(str, allowed))}-bit samples, but the header says Bits Allocated "
                f"{allocated}, Bits Stored {meta.bits_stored}: refused before decoding"
            )
    try:
        head, tail = bytearray(), b""
        for fragment in _fragments(pixel_data):  # header and end read across fragments: a stream may split anywhere
            if len(head) < HEADER_BYTES:
                head += fragment[:HEADER_BYTES - len(head)]
            tail = (tail + bytes(fragment[-64:]))[-64:]
    except ValueError as exc:
        raise CorruptDicomError(f"encapsulated pixel data is malformed: {exc}") from None
    if meta.transfer_syntax in _JPEG_SYNTAXES and not bytes(head[:2]) == b"\xff\xd8":
        raise CorruptDicomError(f"the pixel data is not a {name} codestream (no start-of-image marker)")
    if meta.transfer_syntax in _LOSSLESS_JPEG_SYNTAXES and (stray := _stray_header_bytes(head)) is not None:
        # libjpeg only warns ("extraneous bytes before marker"), but GDCM's lossless JPEG codec then aborts the process
        raise CorruptDicomError(f"the {name} codestream's header has stray bytes at offset {stray} (where a marker "
                                "should start): refused before decoding")
    if meta.transfer_syntax in _JPEG_SYNTAXES:
        if b"\xff\xd9" not in tail:
            # No entropy-coded data holds the end-of-image marker: a stream without it near its end was cut. libjpeg
            # decodes a cut stream with a warning only, the missing rows filled in; CharLS decodes none, but on some
            # spins for seconds before saying so (9 s for a 128 x 80 image). Refused here, at once.
            raise CorruptDicomError(f"the {name} codestream has no end-of-image marker in its last 64 bytes "
                                    "(truncated): refused before decoding")
        _check_jpeg_frame(ds, name, _FRAME_MARKERS[meta.transfer_syntax], _jpeg_frame(head))
    size = codestream_size(meta.transfer_syntax, head)
    if size is not None and size != (meta.rows, meta.columns):
        raise CorruptDicomError(
            f"the compressed image declares {size[0]} x {size[1]} pixels but the DICOM header "
            f"{meta.rows} x {meta.columns}: refused before decoding"
        )
    return bytes(head)


def _check_jpeg_frame(ds: Dataset, name: str, allowed: tuple[int, ...], frame) -> None:
    """The codec allocates and loops over what the frame header declares: it must be there, of a kind the syntax
    carries, with the DICOM header's samples and no more bits than it allocates (the size is held to Rows and Columns
    by ``codestream_size``)."""
    if frame is None:
        raise CorruptDicomError(f"the {name} codestream has no frame header in its first {HEADER_BYTES:,} bytes: "
                                "refused before decoding")
    marker, precision, _, _, components = frame
    if marker not in allowed:
        raise CorruptDicomError(
            f"the {name} codestream's frame header is 0xFF{marker:02X}, not one this syntax carries "
            f"({' or '.join(f'0xFF{m:02X}' for m in allowed)}; progressive, arithmetic and hierarchical JPEG are none "
            "of them): refused before decoding")
    samples, allocated = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 16) or 16)
    if components != samples or not 2 <= precision <= min(allocated, 16):
        raise CorruptDicomError(
            f"the {name} codestream declares {components} components of {precision} bits, but the DICOM header "
            f"{samples} samples of at most {allocated} bits: refused before decoding")


def _decodes_where_it_lies(ds: Dataset) -> bool:
    """Whether ``codec_plugins.decode_greyscale`` gives what ``pixel_array`` would: one frame, read without an
    extended offset table, and the sample attributes pydicom checks before it decodes, present and in range (anything
    else goes through ``pixel_array``, which reads or refuses it)."""
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        representation = int(ds.PixelRepresentation)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return False
    return (frames == 1 and "ExtendedOffsetTable" not in ds and "ExtendedOffsetTableLengths" not in ds
            and representation in (0, 1) and allocated in (8, 16, 32, 64) and 1 <= stored <= allocated)


def _j2k_image_offset(head: bytes) -> bool:
    """Whether a JPEG 2000 codestream (not JP2-wrapped) places its image at an offset on the reference grid."""
    return head[:4] == b"\xff\x4f\xff\x51" and len(head) >= 24 and any(head[16:24])


# Where pydicom's own order is not the best: imagecodecs (``codec_plugins``) decodes JPEG-LS, RLE and greyscale JPEG
# with the GIL let go (CharLS, as pyjpegls wraps it; RLE's segments side by side where a process has decode threads
# to spare; libjpeg-turbo, 5x faster than GDCM on lossless JPEG, where GDCM aborts the process on some malformed
# streams). Without imagecodecs, CharLS (pyjpegls) decodes JPEG-LS in about half GDCM's time here (11 vs 20 ms for a
# 512 x 416 image; GDCM wraps CharLS too, so both accept the same streams).
# JPEG 2000 decoded in full (where the reduced decode cannot be used) by pylibjpeg's OpenJPEG before GDCM's: GDCM
# aborts the process on some malformed codestreams that OpenJPEG refuses with an error.
_PREFERRED_PLUGINS = {"1.2.840.10008.1.2.4.80": (codec_plugins.LABEL, "pyjpegls"),
                      "1.2.840.10008.1.2.4.81": (codec_plugins.LABEL, "pyjpegls"), codec_plugins.RLE: (codec_plugins.LABEL,),
                      **{uid: (codec_plugins.LABEL,) for uid in codec_plugins.JPEG},
                      "1.2.840.10008.1.2.4.90": ("pylibjpeg",), "1.2.840.10008.1.2.4.91": ("pylibjpeg",)}


def _decode_planned(ds: Dataset, meta: DicomMeta, plan: DecodePlan, source,
                    gil_free_only: bool = False, ahead=None) -> tuple[np.ndarray, DecodePlan]:
    """Carry out ``plan``: the pixels at 1/plan.factor of the image's size, and the plan as carried out."""
    if plan.factor == 1:
        return _decode(ds, meta, gil_free_only, source), plan
    levels = plan.factor.bit_length() - 1
    if plan.method == "lowpass" and meta.transfer_syntax in NATIVE_SYNTAXES:
        view = _native_pixels(ds, meta, source)
        if view is not None:
            done = ahead() if ahead is not None else None
            band = done.band_of(view, levels, meta.bits_stored, meta.signed) if done is not None else None
            return (band if band is not None else lowpass(view, levels, meta.bits_stored, meta.signed)), plan
    if plan.method == "wavelet":
        pixel_data = _encapsulated(ds, source)
        _check_codestream(ds, meta, pixel_data)
        reduced, plan = _wavelet(ds, meta, plan, pixel_data, ahead, gil_free_only)
        if reduced is not None:
            return reduced, plan
    return lowpass(_decode(ds, meta, gil_free_only, source), levels, meta.bits_stored, meta.signed), plan


def _stored_dtype(ds: Dataset, meta: DicomMeta) -> np.dtype:
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    return np.dtype(f"{'i' if meta.signed else 'u'}{max(1, allocated // 8)}")


def _wavelet(ds: Dataset, meta: DicomMeta, plan: DecodePlan, pixel_data,
             ahead=None, gil_free_only: bool = False) -> tuple[np.ndarray | None, DecodePlan]:
    """JPEG 2000 at a reduced resolution: the finest levels never decoded. ``(None, plan)`` with the reason in the
    plan's note when this codestream cannot be (the caller then decodes in full and computes the band).
    ``gil_free_only``: ``DecodeElsewhere`` where the decode would hold the GIL for long (``short_in_thread``)."""
    wanted = plan.factor.bit_length() - 1
    try:
        codestream = _codestream(pixel_data)
        if codestream is None:
            return None, replace(plan, method="lowpass", note="full decode: the pixel data holds no fragment")
        found = j2k_levels(codestream)
        if found is None:
            return None, replace(plan, method="lowpass", note="full decode: the codestream's levels are unreadable")
        if found[1:] != (meta.bits_stored, meta.signed):  # pydicom reconciles header and codestream; leave it to it
            return None, replace(plan, method="lowpass", note="full decode: the codestream's samples disagree with "
                                 "the header's Bits Stored / Pixel Representation")
        levels = min(wanted, found[0])
        if gil_free_only and not short_in_thread(meta.rows, meta.columns, levels):
            raise DecodeElsewhere(f"a JPEG 2000 decode at 1/{1 << levels} of {meta.rows} x {meta.columns} holds the "
                                  "GIL for too long to run beside an event loop")
        arr = decode_j2k_reduced(codestream, levels, _stored_dtype(ds, meta), ahead)
    except (DecodeElsewhere, *_INTERRUPTS):
        raise
    except BaseException as exc:  # OpenJPEG through Pillow raises several types; the full decoder then decides
        return None, replace(plan, method="lowpass",
                             note=f"full decode: reduced decoding failed ({type(exc).__name__})")
    if arr.shape != reduced_size(meta.rows, meta.columns, 1 << levels):
        return None, replace(plan, method="lowpass", note=f"full decode: reduced decoding gave {arr.shape}")
    if levels < wanted:  # the same low-pass steps, computed: the result is what more levels would have given
        return lowpass(arr, wanted - levels, meta.bits_stored, meta.signed), replace(
            plan, note=f"the codestream has {found[0]} levels: the last {wanted - levels} computed")
    return arr, plan


def _native_pixels(ds: Dataset, meta: DicomMeta, source) -> np.ndarray | None:
    """Uncompressed pixel data as a view of the file (memory-mapped) or of the caller's bytes, without reading it
    into a copy; None when it is not laid out plainly or the file ends early (the full path then refuses it)."""
    elem = ds.get_item("PixelData", keep_deferred=True)
    if elem is None:
        return None
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    if meta.signed and meta.bits_stored != allocated:
        return None  # sign extension from Bits Stored is the full decoder's job
    tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
    value = getattr(elem, "value", None)
    if value is not None:
        buffer = value  # read already (pixel data of a few kB is never deferred)
    elif tell is None or length is None or length == 0xFFFFFFFF:
        return None
    else:
        buffer = _source_view(source, tell, length)
        if buffer is None:
            return None
    return native_view(buffer, meta.transfer_syntax, meta.rows, meta.columns, allocated, meta.signed)


def _source_view(source, start: int, length: int | None):
    """Bytes ``start`` to ``start + length`` (to the end when None) of the caller's bytes or file, where they lie: a
    memoryview of the bytes, or a read-only memory map of the file. None for another kind of source, or when the
    source ends before."""
    if isinstance(source, _BUFFERS):
        view = memoryview(source).cast("B") if isinstance(source, memoryview) else memoryview(source)
        end = len(view) if length is None else start + length
        return view[start:end] if start <= end <= len(view) else None
    if isinstance(source, (str, os.PathLike)):
        size = os.path.getsize(source)
        end = size if length is None else start + length
        if not start < end <= size:
            return None
        return memoryview(np.memmap(source, dtype=np.uint8, mode="r", offset=start, shape=(end - start,)))
    return None


def _decode(ds: Dataset, meta: DicomMeta, gil_free_only: bool = False, source=None) -> np.ndarray:
    """The image's stored values, decoded in full (``source``: the caller's bytes or file, where the pixel data can be
    read where it lies)."""
    from pydicom.pixels import get_decoder

    if gil_free_only and not (meta.transfer_syntax in NATIVE_SYNTAXES or codec_plugins.gil_free(meta.transfer_syntax)):
        raise DecodeElsewhere(f"{meta.transfer_syntax} is decoded by a decoder that holds the GIL")  # pydicom's plugins

    try:
        decoder = get_decoder(meta.transfer_syntax)
    except NotImplementedError:
        raise MissingCodecError(
            f"transfer syntax {meta.transfer_syntax} has no pixel-data decoder in pydicom"
        ) from None
    hint = _CODEC_HINTS.get(meta.transfer_syntax, "a pydicom pixel-data plugin for it")
    if not decoder.is_available:
        raise MissingCodecError(
            f"cannot decode transfer syntax {meta.transfer_syntax} ({pydicom.uid.UID(meta.transfer_syntax).name}): "
            f"no decoding plugin is installed; install {hint}"
        )
    head, pixel_data = b"", None
    if meta.transfer_syntax in _J2K_SYNTAXES | _JPEG_SYNTAXES | {codec_plugins.RLE}:
        pixel_data = _encapsulated(ds, source)
    if meta.transfer_syntax in _J2K_SYNTAXES | _JPEG_SYNTAXES:
        head = _check_codestream(ds, meta, pixel_data)
    codec_plugins.register()
    preferred = _PREFERRED_PLUGINS.get(meta.transfer_syntax, ())
    if meta.transfer_syntax in _J2K_SYNTAXES and _j2k_image_offset(head):
        preferred = ()  # pylibjpeg's OpenJPEG returns the whole reference grid, offset included: GDCM crops it
    plugin = next((p for p in preferred if p in decoder.available_plugins), None)
    codestream = None
    if plugin == codec_plugins.LABEL and pixel_data is not None and _decodes_where_it_lies(ds):
        try:  # imagecodecs's frame decoded where it lies, the values pixel_array would give, without its copies
            codestream = _codestream(pixel_data)
        except ValueError:  # an offset table other than one frame at 0, or malformed items: pydicom reads them
            codestream = None
    if codestream is None:
        _load_pixel_data(ds)
        if plugin is not None:
            ds.pixel_array_options(decoding_plugin=plugin)
    try:
        if codestream is not None:
            precision = None
            if meta.transfer_syntax in _JPEG_LS_SYNTAXES and meta.signed:  # the precision pydicom's sign correction
                from pydicom.pixels.utils import _get_jpg_parameters  # reads: its parser's, else Bits Stored

                precision = _get_jpg_parameters(bytes(codestream)).get("precision", meta.bits_stored)
            arr = codec_plugins.decode_greyscale(
                meta.transfer_syntax, codestream, meta.rows, meta.columns, int(ds.BitsAllocated), meta.bits_stored,
                meta.signed, precision)
        else:
            arr = ds.pixel_array
    except _INTERRUPTS:
        raise
    except BaseException as exc:  # many error types; Rust codecs raise pyo3's PanicException (a BaseException)
        text = str(exc)
        # the refusal keeps this error as its context: not its frames, whose views of the caller's file would keep
        # the file's memory map open for as long as the refusal is held
        exc.__traceback__, pixel_data, codestream = None, None, None
        if "less than expected" in text:
            raise CorruptDicomError(f"truncated pixel data: {text}") from None
        others = [m.split(" - ")[0] for m in getattr(decoder, "missing_dependencies", [])]
        name = pydicom.uid.UID(meta.transfer_syntax).name
        detail = " ".join(text.split())[:300]
        if plugin is None and meta.transfer_syntax in _PILLOW_8_BIT_ONLY and meta.bits_stored > 8 and others:
            # without imagecodecs: pillow decodes only 8-bit JPEG; 12-bit needs libjpeg or a GDCM built with it,
            # a capability gap, not corruption
            raise MissingCodecError(
                f"{meta.bits_stored}-bit {name} needs a plugin that is not installed ({', '.join(others)}); "
                f"install {hint}"
            ) from None
        maybe = f"; plugins not installed that may decode it: {', '.join(others)}" if others and plugin is None else ""
        raise CorruptDicomError(f"pixel data could not be decoded ({type(exc).__name__}): {detail}{maybe}") from None
    if arr.ndim != 2:
        raise UnsupportedImageError(f"expected a 2-D greyscale frame, decoded shape {arr.shape}")
    return arr
