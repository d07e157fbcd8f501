"""JPEG-LS, RLE and greyscale JPEG through imagecodecs (``medvision.codec_plugins``): the same pixels as pydicom's
other plugins (and DCMTK, for JPEG) on every such file of both real corpora and of the generator, damaged pixel data
refused by name, an RLE frame's segments decoded side by side where the process has decode threads, and the GIL let
go meanwhile."""

import copy
import shutil
import struct
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_fragmented_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from medvision import codec_plugins, resolution
from medvision.dicom_io import read_dicom
from medvision.errors import CorruptDicomError
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import encapsulated, save
from medvision.synth.vendors import VENDORS

SYNTAXES = (JPEGLSLossless, JPEGLSNearLossless, RLELossless)
OTHERS = {JPEGLSLossless: ("pyjpegls", "gdcm"), JPEGLSNearLossless: ("pyjpegls", "gdcm"),
          RLELossless: ("pylibjpeg", "pydicom")}


def corpus_files(syntaxes=SYNTAXES, greyscale: bool = False) -> list[Path]:
    data_store = pytest.importorskip("data_store", reason="pydicom-data is in the 'dev' extra")
    roots = [Path(data_store.__file__).parent / "data", Path(pydicom.__file__).parent / "data" / "test_files"]
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.dcm")):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # the corpora hold files that are not DICOM on purpose
                continue
            if str(getattr(ds.file_meta, "TransferSyntaxUID", "")) in syntaxes and (
                    not greyscale or ds.get("SamplesPerPixel") == 1):
                found.append(path)
    return found


def pixels(path: Path, plugin: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin=plugin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def test_every_jpeg_ls_and_rle_file_of_the_corpora_decodes_as_pydicoms_other_plugins_decode_it():
    """All frames, every layout the corpora hold: 8/16/32-bit, colour by plane and by pixel (JPEG-LS line and sample
    interleaved), multi-frame, near-lossless."""
    codec_plugins.register()
    files = corpus_files()
    assert len(files) >= 18
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        ours = pixels(path, codec_plugins.LABEL)
        for other in OTHERS[syntax]:
            theirs = pixels(path, other)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (path.name, other)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{path.name} against {other}")


@pytest.fixture
def views(matrix):
    """The generator's JPEG-LS and RLE views (``matrix``: one 1024 x 832 view per vendor)."""
    return {key: path for key, path in matrix.items() if key[1] in (JPEGLSLossless, RLELossless)}


@pytest.mark.parametrize("threads", [1, 2])
def test_the_generators_views_read_the_same_and_rle_segments_go_side_by_side(views, threads, monkeypatch):
    """``read_dicom`` (which prefers these plugins) gives pydicom's other plugins' pixels, full and reduced; with two
    decode threads an RLE frame's two segments are decoded on two threads."""
    monkeypatch.setenv(resolution.OPENJPEG_THREADS, str(threads) if threads > 1 else "0")
    seen, decode = [], codec_plugins._segment
    monkeypatch.setattr(codec_plugins, "_segment",
                        lambda *a: seen.append(threading.current_thread().name) or decode(*a))
    for (vendor, syntax), path in views.items():
        seen.clear()
        full, meta = read_dicom(path)
        np.testing.assert_array_equal(full, pixels(path, OTHERS[syntax][0]), err_msg=f"{vendor} {syntax.name}")
        reduced, _ = read_dicom(path, long_side=256)
        assert reduced.shape == (256, 208) and reduced.dtype == full.dtype
        np.testing.assert_array_equal(reduced, resolution.lowpass(full, 2, meta.bits_stored, meta.signed))
        if syntax == RLELossless:
            assert len(seen) == 4 and len(set(seen[:2])) == threads, seen  # two reads, two segments each


def _rle_frame(path: Path) -> tuple[pydicom.Dataset, bytes]:
    ds = pydicom.dcmread(path)
    return ds, b"".join(next(generate_fragmented_frames(ds.PixelData)))


def _refused(ds: pydicom.Dataset, frame: bytes, syntax: str, tmp_path: Path) -> str:
    ds = encapsulated(copy.deepcopy(ds), frame, syntax)
    path = tmp_path / "damaged.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CorruptDicomError) as refusal:
        read_dicom(path)
    with pytest.raises(CorruptDicomError):
        read_dicom(path, long_side=256)
    return refusal.value.message


def test_damaged_rle_frames_are_refused_by_what_is_wrong(views, tmp_path):
    ds, frame = _rle_frame(views[(VENDORS[0].machine_id, RLELossless)])
    count, *offsets = struct.unpack("<16L", frame[:64])
    assert count == 2
    three = struct.pack("<16L", 3, offsets[0], offsets[1], len(frame) - 10, *offsets[3:])
    assert "names 3 segments" in _refused(ds, three + frame[64:], RLELossless, tmp_path)
    beyond = struct.pack("<16L", 2, offsets[0], len(frame) + 100, *offsets[2:])
    assert "do not fit" in _refused(ds, beyond + frame[64:], RLELossless, tmp_path)
    cut = frame[:offsets[1]] + frame[offsets[1]:offsets[1] + (len(frame) - offsets[1]) // 2]
    assert "corrupt" in _refused(ds, cut, RLELossless, tmp_path).lower()  # a run that goes past the segment's end
    import imagecodecs

    low = imagecodecs.packbits_decode(frame[offsets[1]:])
    short = frame[:offsets[1]] + imagecodecs.packbits_encode(low[:len(low) // 2])  # well formed, half the pixels
    assert "decoded to" in _refused(ds, short + b"\x00" * (len(short) % 2), RLELossless, tmp_path)
    assert "header" in _refused(ds, frame[:40], RLELossless, tmp_path)


def test_damaged_jpeg_ls_codestreams_are_refused(views, tmp_path):
    path = views[(VENDORS[1].machine_id, JPEGLSLossless)]
    ds = pydicom.dcmread(path)
    codestream = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    end = b"\xff\xd9"  # with an end-of-image marker: not refused before decoding as a truncated codestream is
    assert codestream.rstrip(b"\x00").endswith(end)
    for damaged in (codestream[:len(codestream) // 2] + end, codestream[:40] + end,
                    codestream[:len(codestream) // 3] + bytes(range(256)) * 64 + end):
        message = _refused(ds, damaged + b"\x00" * (len(damaged) % 2), JPEGLSLossless, tmp_path)
        assert "could not be decoded" in message, message


def test_the_decode_lets_other_threads_run(tmp_path):
    """While a JPEG-LS, RLE or lossless JPEG frame is decoded, another Python thread keeps running: the longest pause
    it sees is a fraction of the decode (a decoder holding the GIL would stop it for the whole decode)."""
    import sys

    codec_plugins.register()
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 64, (2048, 2048)) + np.arange(2048)[:, None]).astype(np.uint16)  # noisy: slow to decode
    ds = example_image(VENDORS[0], 2048, 2048, seed=3)
    ds.PixelData, ds.BitsStored, ds.HighBit = image.tobytes(), 12, 11
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # threads that share the GIL take turns every ms: a longer pause is the decoder's
    try:
        for syntax in (JPEGLSLossless, RLELossless, JPEGLosslessSV1):
            path = tmp_path / f"big-{syntax.name}.dcm"
            if syntax == JPEGLosslessSV1:
                save(copy.deepcopy(ds), tmp_path / "big.dcm", ExplicitVRLittleEndian)
                _dcmtk("dcmcjpeg", tmp_path / "big.dcm", path, "+e1")
            else:
                save(copy.deepcopy(ds), path, syntax)
            for _ in range(3):  # a busy machine may pause any thread now and then; the GIL would pause it every time
                watched, longest, took = _longest_pause_while_decoding(path)
                if watched > 0.8 * took and longest < 0.2 * took:
                    break
            assert watched > 0.8 * took and longest < 0.2 * took, \
                f"{syntax.name}: the other thread stopped {longest * 1e3:.1f} ms of a {took * 1e3:.1f} ms decode"
    finally:
        sys.setswitchinterval(switch)


def _longest_pause_while_decoding(path: Path) -> tuple[float, float, float]:
    """(how long this thread watched the decode, its longest pause meanwhile, how long the decode took)"""
    decoding, took = threading.Event(), []

    def decode():
        decoding.set()
        start = time.perf_counter()
        try:
            pixels(path, codec_plugins.LABEL)
        finally:
            took.append(time.perf_counter() - start)
            decoding.clear()

    worker = threading.Thread(target=decode)
    worker.start()
    decoding.wait()
    longest, first = 0.0, time.perf_counter()
    last = first
    while decoding.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return last - first, longest, took[0]


def test_decode_threads_reads_what_use_decode_threads_set(monkeypatch):
    for value, threads in (("4", 4), ("0", 1), ("", 1), ("x", 1)):
        monkeypatch.setenv(resolution.OPENJPEG_THREADS, value)
        assert resolution.decode_threads() == threads
    monkeypatch.delenv(resolution.OPENJPEG_THREADS)
    assert resolution.decode_threads() == 1


def test_without_imagecodecs_pydicoms_own_plugins_decode_and_the_decode_is_said_to_hold_the_gil(views, dcmtk_jpeg):
    """imagecodecs is a dependency, but a reader built without it still reads JPEG-LS, RLE and lossless JPEG
    (pyjpegls, pylibjpeg-rle, GDCM), the same pixels, and says those decodes hold the GIL (so the service hands them
    to a worker). 12-bit JPEG Extended, which no plugin installed then decodes, is refused as a missing codec."""

    jpeg = next(path for _, syntax, _, _, path in dcmtk_jpeg if syntax == JPEGLosslessSV1)
    twelve_bit = next(path for _, syntax, _, _, path in dcmtk_jpeg if syntax == JPEGExtended12Bit)
    paths = [str(views[(VENDORS[0].machine_id, s)]) for s in (JPEGLSLossless, RLELossless)] + [str(jpeg)]
    syntaxes = [str(JPEGLSLossless), str(RLELossless), str(JPEGLosslessSV1)]
    script = (
        "import sys, json, hashlib; sys.modules['imagecodecs'] = None\n"
        "from medvision import codec_plugins, resolution\n"
        "from medvision.dicom_io import read_dicom\n"
        "from medvision.errors import MissingCodecError\n"
        f"out = {{'gil_free': [resolution.lets_threads_run(s, 224) for s in {syntaxes!r}]}}\n"
        f"out['pixels'] = [hashlib.sha256(read_dicom(p)[0].tobytes()).hexdigest() for p in {paths!r}]\n"
        "try:\n"
        f"    read_dicom({str(twelve_bit)!r})\n"
        "except MissingCodecError as e:\n"
        "    out['12-bit'] = e.message\n"
        "print(json.dumps(out))\n")
    out = _in_a_child(script)
    assert out["gil_free"] == [False, False, False]
    assert "12-bit" in out["12-bit"] and "not installed" in out["12-bit"], out
    import hashlib

    assert out["pixels"] == [hashlib.sha256(read_dicom(p)[0].tobytes()).hexdigest() for p in paths]


def _in_a_child(script: str) -> dict:
    """What ``script``, run in a fresh Python process, prints last as JSON (it must exit cleanly)."""
    import json
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rle_digest(path: str) -> str:
    import hashlib

    return hashlib.sha256(read_dicom(path)[0].tobytes()).hexdigest()


def test_a_forked_child_decodes_rle_segments_side_by_side_too(views, monkeypatch):
    """The side-by-side segments run on a pool of threads; a process forked after the pool started (as the training
    cache's decoding workers are) has none of those threads, and starts its own instead of waiting on them."""
    import multiprocessing

    monkeypatch.setenv(resolution.OPENJPEG_THREADS, "2")
    path = str(views[(VENDORS[2].machine_id, RLELossless)])
    expected = _rle_digest(path)  # the parent's pool is running now
    assert codec_plugins._pool is not None
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_rle_digest, (path,)).get(timeout=60) == expected


def test_an_rle_segment_that_claims_more_than_its_plane_is_refused_without_allocating_it(views, tmp_path):
    """A 2-byte PackBits run stands for 128 bytes: a 3 MB segment can claim 200 MB. No more than twice the plane is
    written (measured in a process of its own: its peak memory grows by far less than the claim); padding within
    that is ignored, as pydicom's own decoder ignores it."""

    ds, frame = _rle_frame(views[(VENDORS[0].machine_id, RLELossless)])
    _, *offsets = struct.unpack("<16L", frame[:64])
    bomb = frame[:offsets[1]] + b"\x81\x07" * 1_600_000  # the low bytes' segment: 1.6 M runs of 128
    path = tmp_path / "bomb.dcm"
    encapsulated(copy.deepcopy(ds), bomb, RLELossless).save_as(path, enforce_file_format=True)
    script = (
        "import json, resource\n"
        "from medvision.dicom_io import read_dicom\n"
        "from medvision.errors import CorruptDicomError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    read_dicom({str(path)!r}); said = None\n"
        "except CorruptDicomError as exc:\n"
        "    said = exc.message\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(json.dumps({'said': said, 'grew_kb': grew}))\n")
    out = _in_a_child(script)
    assert out["said"] and "more than twice" in out["said"], out
    assert out["grew_kb"] < 30_000, out  # the claim: 204.8 MB (decoded whole, the peak grew by ~78 MB here)
    import imagecodecs

    low = imagecodecs.packbits_decode(frame[offsets[1]:])
    padded = frame[:offsets[1]] + imagecodecs.packbits_encode(low + bytes(1000))
    path = tmp_path / "padded.dcm"
    encapsulated(copy.deepcopy(ds), padded + b"\x00" * (len(padded) % 2), RLELossless).save_as(
        path, enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom(path)[0], pixels(path, "pydicom"))


def test_rle_headers_out_of_the_standard_and_little_endian_segment_order(views, tmp_path):
    ds, frame = _rle_frame(views[(VENDORS[1].machine_id, RLELossless)])
    _, *offsets = struct.unpack("<16L", frame[:64])
    sixteen = struct.pack("<16L", 16, *offsets)
    assert "1 to 15" in _refused(ds, sixteen + frame[64:], RLELossless, tmp_path)
    path = views[(VENDORS[1].machine_id, RLELossless)]
    for order in (">", "<"):  # '<': segments written least significant byte first, as pydicom's own decoder reads it
        got = {}
        for plugin in (codec_plugins.LABEL, "pydicom"):
            d = pydicom.dcmread(path)
            d.pixel_array_options(decoding_plugin=plugin, rle_segment_order=order)
            got[plugin] = d.pixel_array
        np.testing.assert_array_equal(got[codec_plugins.LABEL], got["pydicom"])


def test_colour_jpeg_ls_interleaved_by_plane_decodes_as_pyjpegls_decodes_it(tmp_path):
    import jpeg_ls
    from pydicom.dataset import FileMetaDataset

    codec_plugins.register()
    rng = np.random.default_rng(4)
    planes = rng.integers(0, 250, (3, 40, 56)).astype(np.uint8)
    for mode in (0, 2):  # by plane, by pixel
        codestream = bytes(jpeg_ls.encode_array(planes if mode == 0 else np.moveaxis(planes, 0, -1),
                                                interleave_mode=mode))
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 40, 56, 3, "RGB"
        ds.PlanarConfiguration, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 0, 8, 8, 7, 0
        path = tmp_path / f"rgb-{mode}.dcm"
        encapsulated(ds, codestream + b"\x00" * (len(codestream) % 2), JPEGLSLossless).save_as(
            path, enforce_file_format=True)
        ours, theirs = pixels(path, codec_plugins.LABEL), pixels(path, "pyjpegls")
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(ours, np.moveaxis(planes, 0, -1))


def test_a_jpeg_ls_frame_header_is_held_to_the_dicom_header_wherever_the_fragments_split_it(views, tmp_path):
    """CharLS allocates what the frame header (SOF55) declares: components and precision that the DICOM header does
    not allow are refused before decoding, also when the stream is split across fragments before its frame header."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(views[(VENDORS[0].machine_id, JPEGLSLossless)])
    codestream = bytearray(b"".join(next(generate_fragmented_frames(ds.PixelData))))
    at = codestream.index(b"\xff\xf7")  # SOF55: marker, length (2), P, Y (2), X (2), Nf
    for field, value, said in ((at + 9, 3, "3 components"), (at + 4, 17, "of 17 bits")):
        bad = bytearray(codestream)
        bad[field] = value
        if said == "3 components":
            bad[at + 2:at + 4] = (11 + 3 * 3).to_bytes(2, "big")  # a frame header long enough for three components
            bad[at + 11 + 3:at + 11 + 3] = b"\x02\x11\x00\x03\x11\x00"
        for split in (None, 4):
            d = copy.deepcopy(ds)
            parts = [bytes(bad)] if split is None else [bytes(bad[:split]), bytes(bad[split:])]
            d.PixelData = encapsulate(parts)
            path = tmp_path / "sof.dcm"
            d.save_as(path, enforce_file_format=True)
            with pytest.raises(CorruptDicomError, match=said):
                read_dicom(path)


def test_stray_bytes_in_a_lossless_jpeg_header_are_refused_wherever_the_fragments_split_it(tmp_path):
    """GDCM, the lossless JPEG decoder where imagecodecs is not installed, aborts the process on a header with stray
    bytes before its scan (a fuzz finding): refused by name before decoding, also when the header is split across
    fragments."""
    from pydicom.encaps import encapsulate

    root = Path(__file__).resolve().parents[2]
    source = root / "fuzz" / "regressions" / "read" / "jpeg-lossless-stray-header-bytes-gdcm-aborts"
    ds = pydicom.dcmread(source, force=True)
    codestream = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    for parts in ([codestream], [codestream[:6], codestream[6:]]):
        d = copy.deepcopy(ds)
        d.PixelData = encapsulate([p + b"\x00" * (len(p) % 2) for p in parts])
        path = tmp_path / "stray.dcm"
        d.save_as(path)
        with pytest.raises(CorruptDicomError, match="stray bytes"):
            read_dicom(path)


# Greyscale JPEG: libjpeg-turbo through imagecodecs, checked against DCMTK (its own IJG-derived codecs: an encoder
# and a decoder nobody here wrote) and GDCM.
JPEG_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
DCMTK_JPEG = {  # dcmcjpeg's options -> what it writes, and whether the decode must give the source's pixels back
    ("+e1",): (JPEGLosslessSV1, True),
    ("+el", "+sv", "6"): (JPEGLossless, True),
    ("+el", "+sv", "7", "+pt", "2"): (JPEGLossless, False),  # a point transform drops two bits: DCMTK's decode is kept
    ("+ee",): (JPEGExtended12Bit, False),
    ("+eb",): (JPEGBaseline8Bit, False),
}


def _dcmtk(tool: str, source: Path, target: Path, *options: str) -> Path:
    assert shutil.which(tool), f"{tool} (DCMTK) is installed by scripts/system_tools.sh"
    done = subprocess.run([tool, *options, str(source), str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def _dcmtk_pixels(path: Path, tmp_path: Path) -> np.ndarray:
    """DCMTK's decode (``dcmdjpeg``) of ``path``'s pixels."""
    return pydicom.dcmread(_dcmtk("dcmdjpeg", path, tmp_path / f"{path.stem}.dcmdjpeg.dcm")).pixel_array


def test_every_greyscale_jpeg_file_of_the_corpora_decodes_as_dcmtk_and_gdcm_decode_it(tmp_path):
    """Lossless (processes 14 and 14 SV1; 8, 12 and 16-bit, signed) and 12-bit JPEG Extended, which the GDCM that
    pip installs does not decode (DCMTK does: the same values)."""
    codec_plugins.register()
    files = corpus_files(JPEG_SYNTAXES, greyscale=True)
    assert len(files) >= 5
    twelve_bit = 0
    for path in files:
        ours = pixels(path, codec_plugins.LABEL)
        np.testing.assert_array_equal(ours, _dcmtk_pixels(path, tmp_path), err_msg=f"{path.name} against DCMTK")
        try:
            theirs = pixels(path, "gdcm")
        except RuntimeError:
            assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == JPEGExtended12Bit
            twelve_bit += 1
            continue
        assert ours.dtype == theirs.dtype, path.name
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{path.name} against GDCM")
    assert twelve_bit == 2


def test_colour_jpeg_is_left_to_pydicoms_other_plugins():
    """libjpeg-turbo reads a colour stream's colour space from its markers, where DICOM states it in the header: on
    streams without those markers the decoders disagree, so this plugin declines colour and pydicom's others decode
    it as they did."""
    codec_plugins.register()
    files = [p for p in corpus_files(JPEG_SYNTAXES)
             if pydicom.dcmread(p, stop_before_pixels=True).get("SamplesPerPixel") == 3]
    assert len(files) >= 10
    for path in files:
        with pytest.raises(RuntimeError, match="colour JPEG is left to pydicom's other plugins"):
            pixels(path, codec_plugins.LABEL)
        ds = pydicom.dcmread(path)  # pydicom's own order: GDCM first, the plugins after it
        np.testing.assert_array_equal(ds.pixel_array, pixels(path, "gdcm"), err_msg=path.name)


@pytest.fixture(scope="module")
def dcmtk_jpeg(tmp_path_factory, request):
    """The generator's 1024 x 832 views (one per vendor; 12 and 14-bit) written by DCMTK's ``dcmcjpeg`` in each of
    ``DCMTK_JPEG``'s encodings (extended: only the 12-bit views; baseline: an 8-bit copy of each view), with the
    uncompressed file each came from: ``[(options, syntax, lossless, source, compressed)]``."""
    out = tmp_path_factory.mktemp("dcmtk_jpeg")
    made = []
    for vendor in VENDORS:
        ds = example_image(vendor, 1024, 832, seed=2)
        sources = {16: out / f"{vendor.machine_id}.dcm", 8: out / f"{vendor.machine_id}-8bit.dcm"}
        save(copy.deepcopy(ds), sources[16], ExplicitVRLittleEndian)
        eight = copy.deepcopy(ds)
        shift = int(ds.BitsStored) - 8
        eight.PixelData = (ds.pixel_array >> shift).astype(np.uint8).tobytes()
        eight.BitsAllocated, eight.BitsStored, eight.HighBit = 8, 8, 7
        for keyword in ("WindowCenter", "WindowWidth"):  # the window was for 12 or 14 bits
            if keyword in eight:
                delattr(eight, keyword)
        save(eight, sources[8], ExplicitVRLittleEndian)
        for options, (syntax, lossless) in DCMTK_JPEG.items():
            if syntax == JPEGExtended12Bit and ds.BitsStored > 12:
                continue
            source = sources[8 if syntax == JPEGBaseline8Bit else 16]
            target = _dcmtk("dcmcjpeg", source, out / f"{source.stem}{''.join(options)}.dcm", *options)
            made.append((options, syntax, lossless, source, target))
    return made


def test_the_generators_views_written_by_dcmtk_in_jpeg_read_as_dcmtk_reads_them(dcmtk_jpeg, tmp_path):
    """Full and reduced: lossless streams give the source's pixels back, lossy ones DCMTK's decode, bit for bit."""
    seen = set()
    for options, syntax, lossless, source, path in dcmtk_jpeg:
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
        expected = pydicom.dcmread(source).pixel_array if lossless else _dcmtk_pixels(path, tmp_path)
        if not lossless:
            assert not np.array_equal(expected, pydicom.dcmread(source).pixel_array)  # lossy indeed
        full, meta = read_dicom(path)
        np.testing.assert_array_equal(full, expected, err_msg=f"{path.name}: {options}")
        reduced, _ = read_dicom(path, long_side=256)
        np.testing.assert_array_equal(reduced, resolution.lowpass(expected, 2, meta.bits_stored, meta.signed))
        if syntax != JPEGExtended12Bit:  # the GDCM that pip installs decodes all but 12-bit JPEG Extended
            np.testing.assert_array_equal(full, pixels(path, "gdcm"), err_msg=f"{path.name} against GDCM")
        seen.add(syntax)
    assert seen == set(JPEG_SYNTAXES)


def test_a_cut_or_damaged_jpeg_stream_is_refused_by_name(dcmtk_jpeg, tmp_path):
    """libjpeg(-turbo) decodes a cut stream with a warning only, filling in the rows it lacks: a stream without its
    end-of-image marker is refused before decoding, whatever the fragments. One the decoder cannot read is refused
    with its words. (Entropy-coded data damaged in place decodes, with a warning, as GDCM decoded it before.)"""
    from pydicom.encaps import encapsulate

    first = {options: (syntax, path) for options, syntax, _, _, path in reversed(dcmtk_jpeg)}  # one file each
    assert len(first) == len(DCMTK_JPEG)
    for options, (syntax, path) in first.items():
        ds = pydicom.dcmread(path)
        codestream = b"".join(next(generate_fragmented_frames(ds.PixelData)))
        assert codestream.rstrip(b"\x00").endswith(b"\xff\xd9")
        cut = codestream[:len(codestream) // 2]
        said = _refused(ds, cut + b"\x00" * (len(cut) % 2), syntax, tmp_path)
        assert "no end-of-image marker" in said and "(truncated)" in said, said
        d = copy.deepcopy(ds)
        d.PixelData = encapsulate([cut[:1000], cut[1000:] + b"\x00" * (len(cut) % 2)])  # two fragments
        d.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
        with pytest.raises(CorruptDicomError, match="no end-of-image marker"):
            read_dicom(tmp_path / "cut.dcm")
        scan = codestream.index(b"\xff\xda")
        damaged = codestream[:scan + 40] + b"\xff\x62" + codestream[scan + 40:]  # a marker no JPEG process has
        assert "could not be decoded" in _refused(ds, damaged, syntax, tmp_path), options


def _jpeg_file(tmp_path: Path, codestream: bytes, syntax: str, shape: tuple[int, int], allocated: int, stored: int,
               signed: int = 0) -> Path:
    """A greyscale view of the generator around ``codestream``, its header saying ``shape`` and those bits."""
    ds = example_image(VENDORS[0], 128, 104, seed=5)
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, signed
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    path = tmp_path / "crafted.dcm"
    encapsulated(ds, codestream + b"\x00" * (len(codestream) % 2), syntax).save_as(path, enforce_file_format=True)
    return path


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def _with_frame(codestream: bytes, marker: int | None = None, size: tuple[int, int] | None = None,
                components: int | None = None) -> bytes:
    """``codestream`` with its frame header's marker, size or component count (the components' entries grown to
    match) changed."""
    at = next(codestream.index(bytes([0xFF, m])) for m in (0xC0, 0xC1, 0xC3) if bytes([0xFF, m]) in codestream)
    length = int.from_bytes(codestream[at + 2:at + 4], "big")
    frame = bytearray(codestream[at:at + 2 + length])
    if marker is not None:
        frame[1] = marker
    if size is not None:
        frame[5:9] = struct.pack(">HH", *size)
    if components is not None:
        frame[9] = components
        frame[10:] = b"".join(bytes([c + 1]) + frame[11:13] for c in range(components))
        frame[2:4] = (8 + 3 * components).to_bytes(2, "big")
    return codestream[:at] + bytes(frame) + codestream[at + 2 + length:]


def test_a_jpeg_frame_header_the_dicom_header_does_not_allow_is_refused_before_decoding(tmp_path):
    """libjpeg allocates and loops over what the frame header declares, and reads past stray bytes and long
    application segments to find it: the header must be found (in the first 64 kB), hold the DICOM header's size
    wherever stray bytes put it, be of a kind the syntax carries (a progressive stream repeats a pass over the whole
    image per 11-byte scan), with one component of no more bits than allocated."""
    import imagecodecs

    eight = bytes(imagecodecs.jpeg8_encode(np.full((64, 64), 100, np.uint8), level=90))
    twelve = bytes(imagecodecs.jpeg8_encode(np.full((64, 64), 3000, np.uint16), lossless=True, predictor=1,
                                            bitspersample=12))
    cases = [
        ("stray bytes before a 65000 x 65000 frame", JPEGBaseline8Bit,
         eight[:2] + b"\x00\x00" + _with_frame(eight, size=(65000, 65000))[2:], 8, "declares 65000 x 65000"),
        ("64 kB of application data before the frame", JPEGBaseline8Bit,
         eight[:2] + _segment(0xE1, bytes(65000)) * 2 + eight[2:], 8, "no frame header in its first 65,536 bytes"),
        ("a progressive frame", JPEGBaseline8Bit, _with_frame(eight, marker=0xC2), 8, "is 0xFFC2"),
        ("an arithmetic frame", JPEGExtended12Bit, _with_frame(eight, marker=0xC9), 8, "is 0xFFC9"),
        ("a sequential frame under lossless", JPEGLosslessSV1, eight, 8, "is 0xFFC0"),
        ("four components under a greyscale header", JPEGLosslessSV1, _with_frame(twelve, components=4), 16,
         "declares 4 components"),
        ("12 bits where 8 are allocated", JPEGLosslessSV1, twelve, 8, "of 12 bits"),
        ("12-bit lossy where 8 are allocated", JPEGExtended12Bit,
         bytes(imagecodecs.jpeg8_encode(np.full((64, 64), 3000, np.uint16), level=90, bitspersample=12)), 8,
         "of 12 bits"),
    ]
    for _, syntax, codestream, allocated, said in cases:
        path = _jpeg_file(tmp_path, codestream, syntax, (64, 64), allocated, min(allocated, 12))
        with pytest.raises(CorruptDicomError, match=said.replace(".", r"\.")):
            read_dicom(path)


def test_jpeg_samples_come_back_in_the_dicom_headers_container_as_gdcm_returns_them(tmp_path):
    """An 8-bit stream in 16 bits allocated keeps its values (its sign taken from Bits Stored, not from 8 bits), a
    signed 12-bit one comes back negative, and bytes after the end-of-image marker are ignored: as GDCM reads each."""
    import imagecodecs

    row = np.array([255, 128, 5, 127, 0, 1, 200, 64], np.uint8)
    twelve = np.array([4091, 2048, 5, 2047, 0, 1, 4000, 64], np.uint16)
    cases = [(row, 8, 16, 12, 1, [255, 128, 5, 127]), (twelve, 12, 16, 12, 1, [-5, -2048, 5, 2047]),
             (twelve, 12, 16, 12, 0, [4091, 2048, 5, 2047])]
    for values, precision, allocated, stored, signed, expected in cases:
        codestream = bytes(imagecodecs.jpeg8_encode(np.tile(values, (8, 1)), lossless=True, predictor=1,
                                                    bitspersample=precision))
        for tail in (b"", b"\r\n", b"\x12\x34 "):
            path = _jpeg_file(tmp_path, codestream + tail, JPEGLosslessSV1, (8, 8), allocated, stored, signed)
            ours, _ = read_dicom(path)
            assert ours[0, :4].tolist() == expected, (precision, signed, tail)
            np.testing.assert_array_equal(ours, pixels(path, "gdcm"))


def test_read_dicom_decodes_the_frame_where_it_lies_as_pixel_array_would(tmp_path):
    """``read_dicom`` hands these syntaxes' frames to the decoders where they lie
    (``codec_plugins.decode_greyscale``), without pydicom's ``pixel_array`` and its copies: the same values and dtype
    as ``pixel_array`` gives through this plugin and through pydicom's others, on every single-frame greyscale file
    of both corpora that it reads, on RLE frames whose bits above Bits Stored are set, signed and not, and on signed
    12-bit JPEG-LS."""
    from medvision.errors import MedvisionError

    codec_plugins.register()
    compared = 0
    for path in corpus_files((*SYNTAXES, *JPEG_SYNTAXES), greyscale=True):
        try:
            ours, _ = read_dicom(path)
        except MedvisionError:  # multi-frame and the like: the conformance table says which and why
            continue
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for plugin in (codec_plugins.LABEL, *OTHERS.get(syntax, ("gdcm",))):
            try:
                theirs = pixels(path, plugin)
            except RuntimeError:  # GDCM on 12-bit JPEG Extended
                continue
            assert ours.dtype == theirs.dtype, (path.name, plugin)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{path.name} against {plugin}")
        compared += 1
    assert compared >= 10
    rng = np.random.default_rng(7)
    for signed in (0, 1):
        ds = example_image(VENDORS[0], 128, 104, seed=6)
        stored = rng.integers(0, 1 << 16, (128, 104)).astype(np.uint16)  # bits 12 to 15 set at random
        ds.PixelData, ds.PixelRepresentation = stored.tobytes(), signed
        path = tmp_path / f"rle-{signed}.dcm"
        save(ds, path, RLELossless)
        ours, _ = read_dicom(path)
        for plugin in (codec_plugins.LABEL, "pylibjpeg", "pydicom"):
            theirs = pixels(path, plugin)
            assert ours.dtype == theirs.dtype == (np.int16 if signed else np.uint16)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"signed {signed} against {plugin}")
        assert (ours < 0).any() == bool(signed) and int(ours.max()) < 4096
    ds = example_image(VENDORS[0], 128, 104, seed=6)  # signed 12-bit JPEG-LS: sign-extended from its precision
    ds.PixelData = rng.integers(-2048, 2048, (128, 104)).astype(np.int16).tobytes()
    ds.PixelRepresentation = 1
    save(ds, tmp_path / "jls-signed.dcm", JPEGLSLossless)
    ours, _ = read_dicom(tmp_path / "jls-signed.dcm")
    assert ours.dtype == np.int16 and ours.min() < 0
    for plugin in (codec_plugins.LABEL, "pyjpegls", "gdcm"):
        np.testing.assert_array_equal(ours, pixels(tmp_path / "jls-signed.dcm", plugin), err_msg=plugin)


def test_what_the_frame_read_where_it_lies_cannot_judge_goes_through_pixel_array(tmp_path):
    """An extended offset table (it may name another fragment as the frame), sample attributes pydicom refuses
    (Pixel Representation 2, no Bits Stored) and a signed JPEG-LS stream whose fill bytes pydicom's parser stops at
    (its sign correction then uses Bits Stored): read as ``pixel_array`` reads or refuses them. A refusal does not
    keep the file's memory map open."""
    import gc
    import io

    import jpeg_ls
    from pydicom.encaps import encapsulate

    from medvision.errors import MedvisionError

    rng = np.random.default_rng(1)
    first = rng.integers(0, 4096, (128, 104)).astype(np.uint16)
    second = 4095 - first
    streams = [bytes(jpeg_ls.encode_array(a)) for a in (first, second)]
    ds = example_image(VENDORS[0], 128, 104, seed=1)
    ds.PixelData = encapsulate([s + b"\x00" * (len(s) % 2) for s in streams], has_bot=False)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.ExtendedOffsetTable = struct.pack("<Q", len(streams[0]) + len(streams[0]) % 2 + 8)  # the frame: the second
    ds.ExtendedOffsetTableLengths = struct.pack("<Q", len(streams[1]))
    ds.save_as(tmp_path / "eot.dcm", enforce_file_format=True)
    ours, _ = read_dicom(tmp_path / "eot.dcm")
    np.testing.assert_array_equal(ours, second)

    save(example_image(VENDORS[0], 128, 104, seed=1), tmp_path / "rle.dcm", RLELossless)
    for keyword, value in (("PixelRepresentation", 2), ("BitsStored", None)):
        d = pydicom.dcmread(tmp_path / "rle.dcm")
        if value is None:
            delattr(d, keyword)
        else:
            setattr(d, keyword, value)
        path = tmp_path / f"{keyword}.dcm"
        d.save_as(path)
        with pytest.raises(MedvisionError, match=keyword.replace("Pixel", "Pixel ").replace("Bits", "Bits ")):
            read_dicom(path)

    ten = rng.integers(0, 1024, (128, 104)).astype(np.uint16)
    stream = bytes(jpeg_ls.encode_array(ten))
    stream = stream[:2] + b"\xff" + stream[2:]  # a fill byte before the frame header
    d = example_image(VENDORS[0], 128, 104, seed=1)
    d.BitsStored, d.HighBit, d.PixelRepresentation = 12, 11, 1
    path = tmp_path / "fill.dcm"
    encapsulated(d, stream + b"\x00" * (len(stream) % 2), JPEGLSLossless).save_as(path, enforce_file_format=True)
    ours, _ = read_dicom(path)
    np.testing.assert_array_equal(ours, pixels(path, codec_plugins.LABEL))
    np.testing.assert_array_equal(ours, ten.astype(np.int16))  # pydicom: no sign correction from 10 bits

    data = bytearray((tmp_path / "rle.dcm").read_bytes())
    at = pydicom.dcmread(io.BytesIO(bytes(data)), defer_size=100).get_item("PixelData", keep_deferred=True).value_tell
    data[at + 20:at + 24] = struct.pack("<L", 3)  # the RLE header's segment count, in the frame's fragment
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    with pytest.raises(CorruptDicomError, match="names 3 segments") as refusal:
        read_dicom(tmp_path / "bad.dcm")
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, np.memmap)], refusal.value
