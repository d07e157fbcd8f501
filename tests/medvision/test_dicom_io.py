"""read_dicom: correct pixels where it accepts, a specific error where it refuses (one row per case)."""

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medvision.dicom_io import ReadLimits, read_dicom
from medvision.errors import (
    CorruptDicomError,
    EmptyInputError,
    NotAnImageError,
    NotDicomError,
    UnsupportedImageError,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def pydicom_file(name: str) -> str:
    # Only files bundled with pydicom itself: asking for others makes pydicom try the network.
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom test file {name} missing"
    return path


def test_reads_synthetic_mammogram(dicom_files):
    pixels, meta = read_dicom(dicom_files[0])
    assert pixels.ndim == 2 and pixels.shape == (meta.rows, meta.columns)
    assert meta.modality == "MG" and meta.view in {"CC", "MLO"} and meta.laterality in {"L", "R"}
    assert meta.sop_instance_uid and meta.window_centers


def test_bytes_path_and_stream_agree(dicom_files):
    data = dicom_files[1].read_bytes()
    a, _ = read_dicom(dicom_files[1])
    b, _ = read_dicom(data)
    c, _ = read_dicom(io.BytesIO(data))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_meta_carries_no_patient_identifiers(dicom_files):
    ds = pydicom.dcmread(dicom_files[0])
    _, meta = read_dicom(dicom_files[0])
    text = repr(meta.to_dict())
    for value in (str(ds.PatientName), ds.PatientID, ds.AccessionNumber):
        assert value and value not in text


@pytest.mark.parametrize(
    "name",
    ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
     "MR_small_implicit.dcm", "MR_small_bigendian.dcm"],
)
def test_lossless_transfer_syntaxes_equal_the_uncompressed_twin(name):
    ref, _ = read_dicom(pydicom_file("MR_small.dcm"))
    got, meta = read_dicom(pydicom_file(name))
    np.testing.assert_array_equal(ref, got)
    assert meta.signed  # MR_small has signed pixels


def _bomb() -> bytes:
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 60000
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _for_processing(dicom_files) -> bytes:
    ds = pydicom.dcmread(dicom_files[0])
    ds.PresentationIntentType = "FOR PROCESSING"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _truncated(dicom_files) -> bytes:
    data = dicom_files[0].read_bytes()
    return data[: len(data) // 2]


REFUSALS = [
    # (case, input factory, error, words the message must contain)
    ("empty bytes", lambda f: b"", EmptyInputError, "0 bytes"),
    ("png", lambda f: PNG, NotDicomError, "PNG"),
    ("random text", lambda f: b"hello, this is not DICOM at all" * 10, NotDicomError, "not a DICOM"),
    ("truncated mammogram", _truncated, CorruptDicomError, "truncated"),
    ("pydicom truncated MR", lambda f: Path(pydicom_file("MR_truncated.dcm")).read_bytes(), CorruptDicomError, ""),
    ("structured report", lambda f: Path(pydicom_file("test-SR.dcm")).read_bytes(), NotAnImageError, "SR"),
    ("RT plan", lambda f: Path(pydicom_file("rtplan.dcm")).read_bytes(), NotAnImageError, "no pixel data"),
    ("RGB secondary capture", lambda f: Path(pydicom_file("SC_rgb_small_odd.dcm")).read_bytes(), UnsupportedImageError, "colour"),
    ("multi-frame", lambda f: Path(pydicom_file("rtdose.dcm")).read_bytes(), UnsupportedImageError, "multi-frame"),
    ("for processing", _for_processing, UnsupportedImageError, "FOR PROCESSING"),
    ("decompression bomb", lambda f: _bomb(), UnsupportedImageError, "exceeds"),
    ("invalid IS value (badVR)", lambda f: Path(pydicom_file("badVR.dcm")).read_bytes(), CorruptDicomError, "malformed"),
]


@pytest.mark.parametrize("case,make,error,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_problem(case, make, error, words, dicom_files):
    with pytest.raises(error) as info:
        read_dicom(make(dicom_files))
    assert words in info.value.message


def test_limits_are_configurable(dicom_files):
    with pytest.raises(UnsupportedImageError, match="exceeds"):
        read_dicom(dicom_files[0], ReadLimits(max_pixels=1000))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(NotDicomError, match="no such file"):
        read_dicom(tmp_path / "nope.dcm")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_files_give_a_domain_error_or_pixels_never_a_crash(dicom_files):
    """Random truncations and byte flips of real files: read_dicom either decodes or raises a DicomError."""
    from medvision.errors import DicomError

    rng = np.random.default_rng(0)
    sources = [f.read_bytes() for f in dicom_files[:8]]
    for i in range(300):
        data = bytearray(sources[i % len(sources)])
        if i % 3 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for pos in rng.integers(0, min(len(data), 4000), size=int(rng.integers(1, 20))):
                data[pos] = int(rng.integers(0, 256))
        try:
            pixels, _ = read_dicom(bytes(data))
        except DicomError:
            continue
        assert pixels.ndim == 2


def _grey_dataset(bits_stored: int, signed: bool, values: np.ndarray, bits_allocated: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    from pydicom.pixels import pack_bits

    if bits_allocated == 1:
        ds.PixelData = pack_bits(values.astype(np.uint8))
    else:
        # Stored bits only; the unused high bits of a signed value hold its two's-complement sign bits.
        raw = values.astype(np.int64) & ((1 << bits_allocated) - 1)
        ds.PixelData = raw.astype(f"<u{bits_allocated // 8}").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# 1-bit images are unsigned by definition, so there is no signed 1-bit case.
BITS = [(b, s) for b in range(1, 17) for s in (False, True) if not (b == 1 and s)]


@pytest.mark.parametrize("bits_stored,signed", BITS, ids=[f"{b}bit-{'s' if s else 'u'}" for b, s in BITS])
def test_every_bits_stored_and_sign_round_trips(bits_stored, signed):
    allocated = 1 if bits_stored == 1 else 8 if bits_stored <= 8 else 16
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    values = np.random.default_rng(bits_stored).integers(lo, hi + 1, size=(16, 24))
    values[0, :2] = lo, hi  # the extremes must survive
    pixels, meta = read_dicom(_grey_dataset(bits_stored, signed, values, allocated))
    np.testing.assert_array_equal(pixels.astype(np.int64), values)
    assert meta.signed == signed and meta.bits_stored == bits_stored


# --- decompression bombs: refused before anything large is allocated ------------------------------------


def _synthetic_in(dicom_files, syntax: str) -> bytes:
    for f in dicom_files:
        if pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax:
            return f.read_bytes()
    raise AssertionError(f"no synthetic file in {syntax}")


@pytest.mark.parametrize("syntax,marker,offsets", [
    ("1.2.840.10008.1.2.4.90", b"\xff\x4f\xff\x51", (8, 12)),  # J2K SIZ: Xsiz, Ysiz (4 bytes each)
    ("1.2.840.10008.1.2.4.80", b"\xff\xf7", (5, 7)),  # JPEG-LS SOF55: height, width (2 bytes each)
])
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(dicom_files, syntax, marker, offsets):
    data = bytearray(_synthetic_in(dicom_files, syntax))
    at = data.index(marker)
    width = 4 if syntax.endswith(".90") else 2
    for off in offsets:  # claim the biggest image the field can hold
        data[at + off:at + off + width] = b"\xff" * (width - 1) + b"\xf0"
    with pytest.raises(CorruptDicomError, match="the compressed image declares .* but the DICOM header 256 x 208"):
        read_dicom(bytes(data))


def test_a_header_smaller_than_its_codestream_is_refused(dicom_files):
    ds = pydicom.dcmread(io.BytesIO(_synthetic_in(dicom_files, "1.2.840.10008.1.2.4.90")))
    ds.Rows, ds.Columns = 64, 64
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(CorruptDicomError, match="declares 256 x 208 pixels but the DICOM header 64 x 64"):
        read_dicom(buf.getvalue())


@pytest.mark.parametrize("source,syntax", [
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1: only GDCM decodes it here
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.50"),  # pillow fails, GDCM is tried next
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.4.50"),  # not a JPEG stream at all
])
def test_bits_a_jpeg_cannot_carry_are_refused_before_a_codec_can_abort_the_process(source, syntax, tmp_path):
    """GDCM aborts the whole process (an uncaught C++ exception) when a JPEG stream is declared with 32-bit
    samples: found by fuzzing the service. Decoded in a child process so a regression fails this test only."""
    import subprocess
    import sys

    ds = pydicom.dcmread(pydicom_file(source))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=False)
    code = ("import sys; from medvision.dicom_io import read_dicom; from medvision.errors import CorruptDicomError\n"
            "try:\n    read_dicom(sys.argv[1])\nexcept CorruptDicomError as e:\n    print('refused:', e)")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "header says Bits Allocated 32" in done.stdout and "refused before decoding" in done.stdout


def test_a_jpeg_syntax_without_a_jpeg_stream_is_refused(dicom_files):
    ds = pydicom.dcmread(pydicom_file("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    with pytest.raises(CorruptDicomError, match="not a JPEG Lossless.* codestream"):
        read_dicom(buf.getvalue())


def test_a_jpeg_ls_stream_cut_before_its_end_marker_is_refused_at_once(dicom_files):
    """CharLS decodes no JPEG-LS stream without its end-of-image marker, but on some it spins for seconds first
    (a fuzzed 128 x 80 stream: 9 s). Cut anywhere, the stream is refused by name before CharLS sees it; with the
    marker and the fragment's padding it decodes as before."""
    import time

    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(io.BytesIO(_synthetic_in(dicom_files, "1.2.840.10008.1.2.4.80")))
    whole, _ = read_dicom(_synthetic_in(dicom_files, "1.2.840.10008.1.2.4.80"))
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert stream.rstrip(b"\x00").endswith(b"\xff\xd9")
    for cut in (stream[:40], stream[: len(stream) // 2], stream.rstrip(b"\x00")[:-1], stream.rstrip(b"\x00")[:-2]):
        ds.PixelData = encapsulate([cut])
        buf = io.BytesIO()
        ds.save_as(buf)
        t = time.perf_counter()
        with pytest.raises(CorruptDicomError, match="JPEG-LS .* no end-of-image marker .* .truncated."):
            read_dicom(buf.getvalue())
        assert time.perf_counter() - t < 1.0
    ds.PixelData = encapsulate([stream.rstrip(b"\x00") + b"\x00" * 4])
    buf = io.BytesIO()
    ds.save_as(buf)
    assert np.array_equal(read_dicom(buf.getvalue())[0], whole)
    kept = Path(__file__).parents[2] / "fuzz/regressions/read/jpeg-ls-stream-that-keeps-charls-busy-6s"
    with pytest.raises(CorruptDicomError, match="no end-of-image marker"):
        read_dicom(kept.read_bytes())


def test_a_deflate_bomb_is_refused_without_inflating_it(dicom_files):
    import struct
    import zlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = "2.25.1"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    head = io.BytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    size = 200 << 20  # 200 MB of zeros in one OB element, a few hundred KB deflated
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = co.compress(struct.pack("<HH2sHI", 0x0011, 0x1010, b"OB", 0, size))
    zeros = bytes(1 << 20)
    body += b"".join(co.compress(zeros) for _ in range(size >> 20)) + co.flush()
    data = head.getvalue() + body
    assert len(data) < 1 << 20
    with pytest.raises(UnsupportedImageError, match="inflates to more than"):
        read_dicom(data, ReadLimits(max_pixels=1_000_000))


def test_identifiers_come_only_when_asked_and_never_in_the_meta(dicom_files):
    import dataclasses

    ds = pydicom.dcmread(dicom_files[0])
    ds.AccessionNumber = "ACC-7"
    buf = io.BytesIO()
    ds.save_as(buf)
    ids: dict[str, str] = {}
    _, meta = read_dicom(buf.getvalue(), identifiers=ids)
    assert ids == {"AccessionNumber": "ACC-7"}
    assert "ACC-7" not in repr(meta) and "ACC-7" not in str(dataclasses.asdict(meta))
    del ds.AccessionNumber
    buf = io.BytesIO()
    ds.save_as(buf)
    _, _ = read_dicom(buf.getvalue(), identifiers=ids)
    assert ids == {"AccessionNumber": ""}


def _encapsulated_cases():
    from pydicom.encaps import encapsulate

    one, three = encapsulate([b"\xff\x4f" + bytes(range(200))]), encapsulate([b"a" * 10, b"bb" * 7, b"c" * 31])
    delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return {"one fragment": one, "three fragments": three, "with its delimiter": three + delimiter,
            "a fragment cut short": three[:-5], "cut inside a fragment": three[:len(three) - 45],
            "cut inside an item's length": three[:66],
            "cut inside a tag": three + b"\xfe\xff", "only the offset table": encapsulate([])[:8],
            "empty": b"", "an unexpected tag": three + b"\x08\x00\x16\x00" + b"\x00" * 4,
            "an item of undefined length": three + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"}


@pytest.mark.parametrize("case", list(_encapsulated_cases()))
def test_fragments_are_read_in_place_as_pydicom_reads_them(case):
    """The reader finds a codestream's fragments in the caller's buffer without copying them, and reads
    encapsulated pixel data exactly as pydicom does: the same fragments, the same leniency, the same refusals."""
    from pydicom.encaps import generate_fragments

    from medvision.dicom_io import _fragments

    data = _encapsulated_cases()[case]
    try:
        want = list(generate_fragments(data))[1:]
    except ValueError:
        with pytest.raises(ValueError):
            list(_fragments(data))
        return
    got = list(_fragments(data))
    assert [bytes(f) for f in got] == want
    assert all(f.obj is data for f in got)  # views of the caller's bytes, not copies


def test_a_full_field_jpeg_2000_codestream_is_decoded_from_where_it_lies(dicom_files):
    """Reduced JPEG 2000 decoding reads the codestream where it lies in the request's bytes (a 6 MB full-field
    stream is not copied three times on its way to OpenJPEG), and gives the pixels the copying path gave."""
    from medvision.dicom_io import _codestream, _encapsulated, _parse

    data = _synthetic_in(dicom_files, "1.2.840.10008.1.2.4.90")
    ds = _parse(data, defer_pixels=True)
    codestream = _codestream(_encapsulated(ds, data))
    assert isinstance(codestream, memoryview) and codestream.obj is data and bytes(codestream[:2]) == b"\xff\x4f"
    reduced, meta = read_dicom(data, long_side=64)
    assert meta.decode.endswith("wavelet")
    from_path_of_copies = read_dicom(io.BytesIO(data), long_side=64)[0]  # a stream: pixel data read into a copy
    assert np.array_equal(reduced, from_path_of_copies)


def test_a_stream_of_millions_of_empty_items_costs_no_memory_per_item():
    """Encapsulated pixel data of 2 million empty items (16 MB): read one item at a time, as pydicom reads them,
    never held as millions of objects at once."""
    import tracemalloc

    from medvision.dicom_io import _codestream

    data = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" * 2_000_000 + b"\xfe\xff\x00\xe0\x02\x00\x00\x00\xff\x4f"
    tracemalloc.start()
    try:
        codestream = _codestream(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(codestream) == b"\xff\x4f" and peak < 4 << 20, peak


def test_pixel_data_that_runs_past_its_delimiter_is_read_as_pydicom_reads_it(dicom_files):
    """The reduced JPEG 2000 path reads the value pydicom's parse would hold, not the rest of the file: a last item
    whose length swallows the delimiter, and an element after it, decode as they did; an offset table the fast path
    does not take is left to pydicom."""
    from pydicom.encaps import encapsulate, generate_frames

    data = _synthetic_in(dicom_files, "1.2.840.10008.1.2.4.90")
    ds = pydicom.dcmread(io.BytesIO(data))
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    expected = read_dicom(data, long_side=64)[0]
    for name, pixel_data in {
        "two offsets for one frame": b"\xfe\xff\x00\xe0\x08\x00\x00\x00" + bytes(8) + encapsulate([stream])[12:],
        "an offset table of 3 bytes": b"\xfe\xff\x00\xe0\x03\x00\x00\x00" + bytes(3) + encapsulate([stream])[12:],
    }.items():
        ds.PixelData = pixel_data
        buf = io.BytesIO()
        ds.save_as(buf)
        try:
            got = read_dicom(buf.getvalue(), long_side=64)[0]
        except CorruptDicomError:
            with pytest.raises(CorruptDicomError):  # refused by the reduced path only if the full one refuses it too
                read_dicom(buf.getvalue())
            continue
        assert np.array_equal(got, expected), name
    # an element after the pixel data, whose last item's length runs over the delimiter: pydicom scans for the
    # delimiter and its value ends there; the file is not refused for it
    ds.PixelData = encapsulate([stream])
    buf = io.BytesIO()
    ds.save_as(buf)
    raw = bytearray(buf.getvalue()) + b"\xfc\xff\xfc\xff" + b"OB\x00\x00" + (4).to_bytes(4, "little") + bytes(4)
    at = raw.rfind(b"\xfe\xff\x00\xe0")  # the last item: its length now counts the delimiter's 8 bytes
    raw[at + 4:at + 8] = (int.from_bytes(raw[at + 4:at + 8], "little") + 8).to_bytes(4, "little")
    full = read_dicom(bytes(raw))[0]
    assert np.array_equal(read_dicom(bytes(raw), long_side=64)[0], expected) and full.shape == (ds.Rows, ds.Columns)
