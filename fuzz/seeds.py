"""Seed corpora for the fuzz targets: the synthetic generator's images in every transfer syntax it writes (three
vendors, small sizes), and the real corpus files (pydicom-data and pydicom's own test files) up to a size limit;
STOW-RS bodies and C-STORE data sets made from them."""

from __future__ import annotations

import copy
import hashlib
import struct
from pathlib import Path

from fuzz.targets import BOUNDARY

MAX_SEED_BYTES = 256 * 1024


def _synthetic() -> list[bytes]:
    import tempfile

    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

    from medvision.synth.dataset import example_image
    from medvision.synth.dicom_writer import save
    from medvision.synth.vendors import VENDORS

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, vendor in enumerate(VENDORS):
            ds = example_image(vendor, 96 + 16 * n, 80, seed=n)
            for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless):
                path = Path(tmp) / f"{n}-{syntax}.dcm"
                save(copy.deepcopy(ds), path, syntax)
                out.append(path.read_bytes())
            out += _jpeg(ds)
    return out


def _jpeg(ds) -> list[bytes]:
    """``ds`` as JPEG, written by libjpeg-turbo (imagecodecs): lossless SV1 and predictor 6, and where its samples
    allow, 12-bit extended and (an 8-bit copy) baseline."""
    import io

    import imagecodecs
    import numpy as np
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1

    from medvision.synth.dicom_writer import encapsulated

    pixels, bits = ds.pixel_array, int(ds.BitsStored)
    eight = (pixels >> (bits - 8)).astype(np.uint8)
    streams = [(JPEGLosslessSV1, pixels, imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1,
                                                                  bitspersample=bits)),
               (JPEGLossless, pixels, imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=6,
                                                               bitspersample=bits)),
               (JPEGBaseline8Bit, eight, imagecodecs.jpeg8_encode(eight, level=90))]
    if bits <= 12:
        streams.append((JPEGExtended12Bit, pixels, imagecodecs.jpeg8_encode(pixels, level=90, bitspersample=12)))
    out = []
    for syntax, stored, stream in streams:
        d = copy.deepcopy(ds)
        if stored.dtype == np.uint8:
            d.BitsAllocated, d.BitsStored, d.HighBit = 8, 8, 7
        buf = io.BytesIO()
        encapsulated(d, bytes(stream) + b"\x00" * (len(stream) % 2), syntax).save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _corpus() -> list[bytes]:
    import pydicom

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    out = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in (".dcm", "") and 0 < path.stat().st_size <= MAX_SEED_BYTES:
                out.append(path.read_bytes())
    return out


def _without_meta(data: bytes) -> tuple[str, bytes] | None:
    """A Part 10 file's transfer syntax and its data set (what a C-STORE carries), or None."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return None
    end = 144 + struct.unpack("<I", data[140:144])[0]
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    try:
        syntax = str(dcmread(DicomBytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
    except Exception:
        return None
    return syntax, data[end:]


def write(folder: Path, target: str) -> int:
    """Write ``target``'s seeds into ``folder`` (one file each, named by content); returns how many."""
    from fuzz.targets import DIMSE_SYNTAXES

    folder.mkdir(parents=True, exist_ok=True)
    files = _synthetic() + _corpus()
    if target == "read":
        seeds = files
    elif target == "stow":
        seeds = []
        for i in range(0, len(files), 2):
            body = b""
            for f in files[i:i + 2]:
                body += b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
            seeds.append(body + b"--" + BOUNDARY + b"--\r\n")
    elif target == "dimse":
        seeds = []
        for f in files:
            found = _without_meta(f)
            if found and found[0] in DIMSE_SYNTAXES:
                seeds.append(bytes([DIMSE_SYNTAXES.index(found[0])]) + found[1])
    else:
        raise ValueError(f"no such target {target!r}")
    for s in seeds:
        (folder / hashlib.sha1(s).hexdigest()).write_bytes(s)
    return len(seeds)
