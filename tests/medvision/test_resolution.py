"""Decoding only the pixels the model sees: the plan, the reduced decoders and their fallbacks. The reduced image is
JPEG 2000's own low-pass band, so the same image gives the same pixels in every lossless transfer syntax, bit for
bit, whether its finest levels were skipped or computed; and how far the model's input then is from decoding every
pixel (bounds measured on every vendor and syntax of the synthetic generator and every corpus file the reader
accepts)."""

import csv
import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import require_tool
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from medvision import resolution
from medvision.dicom_io import read_dicom
from medvision.errors import CorruptDicomError
from medvision.preprocess import Preprocess, PreprocessConfig, display_and_box
from medvision.resolution import J2K_SYNTAXES, j2k_levels, lowpass, plan_decode, reduced_size, reduction
from medvision.synth.vendors import VENDORS

SYNTAXES = [ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless]
SIZE, LONG_SIDE = 128, 192  # a 128-px model asking for 192 px: a 1024-row image is decoded at 1/4
# The model input (normalised, std ~0.5) of a reduced decode against full decode + the same preprocessing, measured
# on the generator's three vendors in its four transfer syntaxes at 1024 x 832. The worst case is the vendor whose
# tissue fades into the background (gamma 1.4): the low-pass band smooths the faint rim, so the breast's box loses
# a few rows. These are the bounds asserted; the clinical comparison is benchmarks/decode_contract.py's.
MEAN_BOUND, P99_BOUND = 0.015, 0.08  # measured 0.009 and 0.052 at worst over the vendors and syntaxes


@pytest.mark.parametrize("rows, columns, long_side, factor", [
    (3328, 2560, 336, 8), (3328, 2560, 0, 1), (3328, 2560, 416, 8), (3328, 2560, 417, 4), (512, 416, 240, 2),
    (512, 416, 513, 1), (256, 208, 96, 2), (4096, 3, 1, 4096), (1, 1, 1, 1), (2560, 3328, 336, 8)])
def test_the_plan_keeps_the_long_side_the_contract_asks_for(rows, columns, long_side, factor):
    assert reduction(rows, columns, long_side) == factor
    if factor > 1:
        assert max(reduced_size(rows, columns, factor)) >= long_side
        assert max(reduced_size(rows, columns, factor * 2)) < long_side or factor * 2 > max(rows, columns)
    assert plan_decode(JPEG2000Lossless, rows, columns, long_side).method == ("wavelet" if factor > 1 else "full")
    assert plan_decode(RLELossless, rows, columns, long_side).method == ("lowpass" if factor > 1 else "full")


def _reference_lowpass(x: np.ndarray, levels: int) -> np.ndarray:
    """ISO/IEC 15444-1 F.3.8.2 (reversible 5/3 lifting, symmetric extension), one sample at a time."""
    def step(v: list[int]) -> list[int]:
        n = len(v)
        if n == 1:
            return v

        def at(i: int) -> int:  # whole-sample symmetric extension: ... x2 x1 | x0 x1 ... x(n-1) | x(n-2) ...
            i %= 2 * (n - 1)
            return v[i] if i < n else v[2 * (n - 1) - i]

        d = {k: at(2 * k + 1) - (at(2 * k) + at(2 * k + 2)) // 2 for k in range(-1, n // 2 + 1)}
        return [at(2 * k) + (d[k - 1] + d[k] + 2) // 4 for k in range(-(-n // 2))]

    a = x.astype(np.int64).tolist()
    for _ in range(levels):
        a = [step(col) for col in np.array(a).T.tolist()]  # vertical first (each column), then horizontal
        a = np.array(a).T.tolist()
        a = [step(row) for row in a]
    return np.array(a)


@pytest.mark.parametrize("shape", [(37, 29), (64, 48), (5, 3), (2, 1), (1, 7), (40, 40),
                                   (203, 131), (130, 65), (129, 9)])  # these span several strips (STRIP_ROWS)
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_lowpass_is_the_standards_5_3_lifting(shape, levels):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4096, size=shape).astype(np.uint16)
    got = lowpass(a, levels, 12, False)
    want = np.clip(_reference_lowpass(a, levels), 0, 4095)
    assert got.dtype == a.dtype and got.shape == reduced_size(*shape, 1 << levels)
    np.testing.assert_array_equal(got, want)
    s = (a.astype(np.int32) - 2048).astype(np.int16)  # signed samples: the same arithmetic, the signed range
    np.testing.assert_array_equal(lowpass(s, levels, 12, True),
                                  np.clip(_reference_lowpass(s, levels), -2048, 2047))


@pytest.mark.parametrize("pattern", ["random", "checkerboard", "stripes", "uint8", "a value above 13 bits",
                                     "signed checkerboard", "signed random"])
def test_every_level_in_int16_is_exact_at_the_extremes_of_its_range(pattern, monkeypatch):
    """A level runs in int16 when its samples' range leaves every intermediate inside it (``_fits``): the values
    that push the sums furthest (a checkerboard of the range's ends, alternating rows) give what the wide arithmetic
    gives, at every level; a value past 13 bits sends the image through the int32 path."""
    rng = np.random.default_rng(1)
    top = (1 << 13) - 1
    shape = (133, 70)
    board = np.indices(shape).sum(0) % 2
    a = {"random": lambda: rng.integers(0, top + 1, size=shape),
         "checkerboard": lambda: board * top,
         "stripes": lambda: (np.arange(shape[0])[:, None] % 2) * np.full(shape, top),
         "uint8": lambda: rng.integers(0, 256, size=shape),
         "a value above 13 bits": lambda: np.where(rng.random(shape) < 0.01, 1 << 15, rng.integers(0, top, shape)),
         "signed checkerboard": lambda: board * top - 4096,  # 13-bit signed: the widest signed range int16 holds
         "signed random": lambda: rng.integers(-4096, 4096, size=shape),
         }[pattern]()
    signed = pattern.startswith("signed")
    a = a.astype(np.uint8 if pattern == "uint8" else np.int16 if signed else np.uint16)
    bits = 8 if pattern == "uint8" else 13
    used = []
    level = resolution._level

    def spy(x, dtype, checked=False, ready=None):  # the type of each level as computed (a checked int16 try may give way)
        out = level(x, dtype, checked, ready)
        if out is not None:
            used.append(dtype)
        return out

    monkeypatch.setattr(resolution, "_level", spy)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    for levels in (1, 2, 3):
        used.clear()
        np.testing.assert_array_equal(lowpass(a, levels, bits, signed),
                                      np.clip(_reference_lowpass(a, levels), lo, hi))
    assert used[0] == (np.int32 if pattern == "a value above 13 bits" else np.int16)
    if pattern == "uint8":  # a narrow image's bands stay narrow: its later levels run in int16 too
        assert used == [np.int16] * 3


def test_the_int16_bound_sits_where_the_arithmetic_says():
    """13 bits, unsigned or signed, is the widest range a level can take in int16: one more value at either end
    and a sum of details would pass 32767."""
    assert resolution._fits(0, (1 << 13) - 1) == np.int16 and resolution._fits(0, 1 << 13) == np.int32
    assert resolution._fits(-4096, 4095) == np.int16
    assert resolution._fits(-4097, 4095) == np.int32 and resolution._fits(-4096, 4096) == np.int32


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[s.name for s in SYNTAXES])
@pytest.mark.parametrize("vendor", [v.machine_id for v in VENDORS])
def test_every_vendor_and_syntax_decodes_reduced_close_to_full(matrix, vendor, syntax):
    path = matrix[(vendor, syntax)]
    full, meta = read_dicom(path)
    reduced, rmeta = read_dicom(path, long_side=LONG_SIDE)
    assert rmeta.decode_factor == 4 and reduced.shape == reduced_size(1024, 832, 4) and reduced.dtype == full.dtype
    assert rmeta.decode == ("1/4 wavelet" if syntax in J2K_SYNTAXES else "1/4 lowpass")
    # the two finest levels skipped (JPEG 2000) or computed (the others): the same pixels, bit for bit
    np.testing.assert_array_equal(reduced, lowpass(full, 2, meta.bits_stored, meta.signed))
    full_pre = Preprocess(PreprocessConfig(image_size=SIZE))
    reduced_pre = Preprocess(PreprocessConfig(image_size=SIZE, decode_long_side=LONG_SIDE))
    x_full, _ = full_pre.from_dicom(path)
    x_reduced, _ = reduced_pre.from_dicom(path)
    d = np.abs(x_full - x_reduced)
    assert d.mean() <= MEAN_BOUND and np.percentile(d, 99) <= P99_BOUND, (d.mean(), np.percentile(d, 99))
    # the breast's box is measured on the same low-pass band under both contracts: the same region, exactly
    _, box = display_and_box(full, meta, full_pre.cfg)
    _, rbox = display_and_box(reduced, rmeta, full_pre.cfg)
    assert box == tuple(min(4 * b, n) for b, n in zip(rbox, (1024, 1024, 832, 832), strict=True))
    # measured on the decoded pixels instead (artifacts written before), it moves by a few rows at most
    old = PreprocessConfig(image_size=SIZE, crop_long_side=0)
    _, box = display_and_box(full, meta, old)
    _, rbox = display_and_box(reduced, rmeta, old)
    assert max(abs(a - 4 * b) for a, b in zip(box, rbox, strict=True)) <= 0.02 * 1024
    assert full_pre.geometry(full, meta).flipped == full_pre.geometry(reduced, rmeta).flipped


@pytest.mark.parametrize("vendor", [v.machine_id for v in VENDORS])
def test_the_same_image_gives_the_same_reduced_pixels_in_every_syntax(matrix, vendor):
    """A model's score must not depend on how the archive compressed the image."""
    reduced = [read_dicom(matrix[(vendor, syntax)], long_side=LONG_SIDE)[0] for syntax in SYNTAXES]
    for other in reduced[1:]:
        np.testing.assert_array_equal(other, reduced[0])


def test_reduced_decoding_from_bytes_and_from_a_path_agree(matrix):
    for syntax in (ExplicitVRLittleEndian, JPEG2000Lossless):
        path = matrix[(21, syntax)]
        a, _ = read_dicom(path, long_side=LONG_SIDE)
        b, _ = read_dicom(path.read_bytes(), long_side=LONG_SIDE)
        np.testing.assert_array_equal(a, b)



@pytest.mark.parametrize("levels", [1, 2])
def test_jpeg_2000_decoded_on_several_threads_gives_the_same_pixels(matrix, monkeypatch, levels):
    """``use_decode_threads``: OpenJPEG decodes a codestream's code-blocks side by side (the service's own process
    does, for a request alone and the review UI's renderings); the pixels are the one-thread decode's, bit for
    bit, at every level."""
    path = matrix[(21, JPEG2000Lossless)]
    monkeypatch.setenv(resolution.OPENJPEG_THREADS, "0")  # one thread; the test's environment back afterwards
    one, _ = read_dicom(path, long_side=1024 >> levels)
    resolution.use_decode_threads(4)
    assert os.environ[resolution.OPENJPEG_THREADS] == "4"
    several, meta = read_dicom(path, long_side=1024 >> levels)
    assert meta.decode == f"1/{1 << levels} wavelet"
    np.testing.assert_array_equal(several, one)


def test_decode_threads_keep_a_value_the_user_set(monkeypatch):
    monkeypatch.setenv(resolution.OPENJPEG_THREADS, "3")
    resolution.use_decode_threads(8, keep_set=True)
    assert os.environ[resolution.OPENJPEG_THREADS] == "3"
    resolution.use_decode_threads(1)  # a worker's setting is its own: the calling thread, no pool (OpenJPEG's 0)
    assert os.environ[resolution.OPENJPEG_THREADS] == "0"
    resolution.use_decode_threads(0)
    assert os.environ[resolution.OPENJPEG_THREADS] == "0"
    monkeypatch.delenv(resolution.OPENJPEG_THREADS)
    resolution.use_decode_threads(1)  # unset means one already: left unset (no setenv beside running threads)
    assert resolution.OPENJPEG_THREADS not in os.environ

# -- the real corpus: nothing that decoded before is refused, and the reduced pixels are what they should be --

data_store = pytest.importorskip("data_store", reason="pydicom-data is in the 'dev' extra")
ROOTS = {"pydicom-data": Path(data_store.__file__).parent / "data",
         "pydicom": Path(pydicom.__file__).parent / "data" / "test_files"}
with Path(__file__).with_name("dicom_conformance.csv").open(newline="") as _fh:
    DECODABLE = [r for r in csv.DictReader(_fh) if r["expect"] == "ok"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("row", DECODABLE, ids=[f"{r['corpus']}/{r['file']}" for r in DECODABLE])
def test_every_corpus_image_decodes_at_half_size(row):
    """Nothing that decoded before is refused under a reduced contract."""
    path = ROOTS[row["corpus"]] / row["file"]
    full, meta = read_dicom(path)
    long_side = -(-max(meta.rows, meta.columns) // 2)
    reduced, rmeta = read_dicom(path, long_side=long_side)
    assert rmeta.decode_factor == 2 and reduced.shape == reduced_size(meta.rows, meta.columns, 2)
    assert reduced.dtype == full.dtype
    expected = lowpass(full, 1, meta.bits_stored, meta.signed)
    if rmeta.decode.startswith("1/2 wavelet") and "2000 Image Compression" in pydicom.uid.UID(meta.transfer_syntax).name \
            and "Lossless" not in pydicom.uid.UID(meta.transfer_syntax).name:
        # a lossy (9/7) codestream's own low-pass band: as close as lossy pixels are (stored units, the range)
        span = max(1.0, float(full.max()) - float(full.min()))
        assert np.abs(reduced.astype(np.float64) - expected).mean() <= 0.01 * span
    else:
        np.testing.assert_array_equal(reduced, expected)


def _syntax(row) -> str:
    meta = pydicom.dcmread(ROOTS[row["corpus"]] / row["file"], stop_before_pixels=True, force=True).get("file_meta")
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


J2K_CORPUS = [r for r in DECODABLE if _syntax(r) in J2K_SYNTAXES]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("row", J2K_CORPUS, ids=[r["file"] for r in J2K_CORPUS])
def test_corpus_jpeg_2000_at_level_zero_is_pydicoms_decode_exactly(row):
    from medvision.resolution import decode_j2k_reduced

    path = ROOTS[row["corpus"]] / row["file"]
    ds = pydicom.dcmread(path)
    full, meta = read_dicom(path)
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    if j2k_levels(codestream)[1:] != (meta.bits_stored, meta.signed):
        # header and codestream disagree (pydicom reconciles them): the reader decodes these in full
        _, reduced = read_dicom(path, long_side=max(meta.rows, meta.columns) // 2)
        assert reduced.decode.startswith("1/2 lowpass (full decode: the codestream's samples disagree")
        return
    try:
        level0 = decode_j2k_reduced(codestream, 0, full.dtype)
    except ValueError as exc:  # signed samples: the reader falls back to full decoding for these
        assert "signed" in str(exc)
        return
    np.testing.assert_array_equal(level0, full)


# -- fallbacks ---------------------------------------------------------------------------------------------------


def _with_codestream(path: Path, codestream: bytes, out: Path, **attrs) -> Path:
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([codestream])
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_codestream_with_fewer_levels_is_decoded_at_its_coarsest_then_block_averaged(matrix, tmp_path):
    from PIL import Image

    raw, _ = read_dicom(matrix[(21, ExplicitVRLittleEndian)])
    buf = io.BytesIO()
    Image.fromarray(raw.astype(np.uint16)).save(buf, "JPEG2000", no_jp2=True, num_resolutions=2)  # one level
    shallow = _with_codestream(matrix[(21, JPEG2000Lossless)], buf.getvalue(), tmp_path / "shallow.dcm",
                               BitsStored=16, HighBit=15)  # Pillow writes 16-bit samples
    assert j2k_levels(buf.getvalue())[0] == 1
    reduced, meta = read_dicom(shallow, long_side=LONG_SIDE)
    assert meta.decode_factor == 4 and meta.decode == "1/4 wavelet (the codestream has 1 levels: the last 1 computed)"
    np.testing.assert_array_equal(reduced, lowpass(raw, 2, 16, False))  # exactly what two levels would give


def test_a_codestream_with_an_image_offset_falls_back_to_full_decoding(matrix, tmp_path):
    """An odd image offset puts the wavelet's low-pass samples on odd columns: not the band the contract defines (and
    Pillow refuses to reduce it). The full decoder reads it; the band is computed from its pixels."""
    raw, _ = read_dicom(matrix[(21, ExplicitVRLittleEndian)])
    source, out = tmp_path / "in.raw", tmp_path / "offset.j2k"
    source.write_bytes(raw.astype(">u2").tobytes())
    subprocess.run([require_tool("opj_compress"), "-i", str(source), "-o", str(out), "-F", "832,1024,1,12,u@1x1",
                    "-d", "37,11"], check=True, capture_output=True, timeout=60)
    offset = _with_codestream(matrix[(21, JPEG2000Lossless)], out.read_bytes(), tmp_path / "offset.dcm")
    np.testing.assert_array_equal(read_dicom(offset)[0], raw)
    reduced, meta = read_dicom(offset, long_side=LONG_SIDE)
    assert meta.decode.startswith("1/4 lowpass (full decode: ")
    np.testing.assert_array_equal(reduced, lowpass(raw, 2, 12, False))


def test_a_codestream_that_disagrees_with_its_header_falls_back_to_full_decoding(matrix, tmp_path):
    ds = pydicom.dcmread(matrix[(21, JPEG2000Lossless)])
    codestream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    codestream[42] |= 0x80  # SIZ says signed: Pillow cannot give the sign back, the full decoder can
    odd = _with_codestream(matrix[(21, JPEG2000Lossless)], bytes(codestream), tmp_path / "signed.dcm")
    try:
        full, _ = read_dicom(odd)
    except CorruptDicomError:
        pytest.skip("this codestream edit is not decodable by the full decoder either")
    reduced, meta = read_dicom(odd, long_side=LONG_SIDE)
    assert meta.decode.startswith("1/4 lowpass (full decode: the codestream's samples disagree")
    np.testing.assert_array_equal(reduced, lowpass(full, 2, meta.bits_stored, meta.signed))


def test_a_truncated_codestream_is_refused_by_name_as_before(matrix, tmp_path):
    ds = pydicom.dcmread(matrix[(21, JPEG2000Lossless)])
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    cut = _with_codestream(matrix[(21, JPEG2000Lossless)], codestream[: len(codestream) // 3], tmp_path / "cut.dcm")
    for long_side in (0, LONG_SIDE):
        with pytest.raises(CorruptDicomError, match="could not be decoded"):
            read_dicom(cut, long_side=long_side)


def test_a_truncated_uncompressed_file_is_refused_by_name_as_before(matrix, tmp_path):
    data = matrix[(21, ExplicitVRLittleEndian)].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])
    for source in (cut, data[: len(data) - 5000]):
        with pytest.raises(CorruptDicomError):
            read_dicom(source, long_side=LONG_SIDE)


def test_the_contract_is_validated_and_stated():
    with pytest.raises(ValueError, match="below image_size"):
        PreprocessConfig(image_size=224, decode_long_side=200)
    assert "full resolution" in PreprocessConfig().decoding
    assert "336 px" in PreprocessConfig(image_size=224, decode_long_side=336).decoding


def test_only_decoders_that_let_go_of_the_gil_are_said_to_let_threads_run():
    """What the service decodes in its own threads (``lets_threads_run``): uncompressed pixels, JPEG-LS, RLE and
    greyscale JPEG at any size (imagecodecs: ``codec_plugins``), JPEG 2000 / HTJ2K at a reduced size where the
    contract asks for little (OpenJPEG through Pillow holds the GIL, briefly then). pylibjpeg's plugins and pydicom's
    decoding JPEG 2000 at full size hold the GIL throughout (measured: a full-field JPEG 2000 image 0.5 s); so does
    Pillow for a large reduced decode (a review UI's at 1/2: 150-200 ms)."""
    from pydicom.uid import (
        HTJ2KLossless,
        ImplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEGLosslessSV1,
        JPEGLSNearLossless,
    )

    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.2", JPEGLSLossless,
                   JPEGLSNearLossless, RLELossless, JPEGBaseline8Bit, JPEGLosslessSV1):
        assert resolution.lets_threads_run(syntax, 0) and resolution.lets_threads_run(syntax, 224)
    for syntax in (JPEG2000Lossless, HTJ2KLossless):
        assert resolution.lets_threads_run(syntax, 224) and not resolution.lets_threads_run(syntax, 0)
        assert not resolution.lets_threads_run(syntax, 1024)
    for syntax in ("1.2.840.10008.1.2.4.92", None, ""):
        assert not resolution.lets_threads_run(syntax, 224), syntax


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[s.name for s in SYNTAXES])
def test_a_gil_free_read_decodes_as_the_plain_one_or_hands_the_file_on(matrix, syntax):
    """``read_dicom(..., gil_free_only=True)``: the same pixels where the decode lets other threads run (uncompressed;
    JPEG 2000 at a reduced size; JPEG-LS and RLE), ``DecodeElsewhere`` before any other decoder runs (JPEG 2000 in full
    included)."""
    from medvision.dicom_io import DecodeElsewhere

    path = matrix[(VENDORS[0].machine_id, syntax)]
    for long_side in (LONG_SIDE, 0):
        free = syntax in (*resolution.NATIVE_SYNTAXES, JPEGLSLossless, RLELossless) or (syntax in J2K_SYNTAXES
                                                                                        and long_side)
        if free:
            got, meta = read_dicom(path, long_side=long_side, gil_free_only=True)
            expected, expected_meta = read_dicom(path, long_side=long_side)
            np.testing.assert_array_equal(got, expected)
            assert meta == expected_meta
        else:
            with pytest.raises(DecodeElsewhere):
                read_dicom(path, long_side=long_side, gil_free_only=True)
