"""Reading an image while its file arrives (``medvision.read_ahead``): the pixels read ahead are the ones the read
of the whole file gives, it takes them only where they came from the same input, and anything else reads nothing
ahead and changes nothing."""

import copy
import io
import threading
import time

import numpy as np
import pydicom
import pytest
from helpers import require_tool
from pydicom.uid import (
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from medvision import dicom_io, read_ahead, resolution
from medvision.dicom_io import read_dicom
from medvision.errors import MedvisionError
from medvision.read_ahead import decode_ahead
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import encapsulated, htj2k_codestream, save
from medvision.synth.vendors import VENDORS

LONG_SIDE = 128  # 2048 x 1664 read at 1/16


class Feed:
    """A file's bytes arriving into a buffer of its size, 64 kB at a time from another thread (``Arriving``)."""

    def __init__(self, data: bytes, pause_s: float = 0.0002, stop_at: int | None = None) -> None:
        self.data, self.view = data, memoryview(bytearray(len(data)))
        self.at, self.over, self.cond = 0, False, threading.Condition()
        self.thread = threading.Thread(target=self._feed, args=(pause_s, len(data) if stop_at is None else stop_at))
        self.thread.start()

    def _feed(self, pause_s: float, stop_at: int) -> None:
        for at in range(0, stop_at, 65536):
            n = min(stop_at, at + 65536)
            self.view[at:n] = self.data[at:n]
            with self.cond:
                self.at = n
                self.cond.notify_all()
            time.sleep(pause_s)
        with self.cond:
            self.over = True
            self.cond.notify_all()

    def __call__(self, n: int):
        with self.cond:
            self.cond.wait_for(lambda: self.at >= n or self.over)
            return self.view[:self.at] if self.at >= n else None


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A 2048 x 1664 image of each vendor in each transfer syntax (its JPEG 2000 / HTJ2K codestream over 1 MB: cut)."""
    folder = tmp_path_factory.mktemp("ahead")
    out = {}
    for vendor in VENDORS:
        ds = example_image(vendor, 2048, 1664, seed=4)
        for syntax in (JPEG2000Lossless, ExplicitVRLittleEndian, RLELossless, JPEGLSLossless):
            path = folder / f"{vendor.machine_id}-{syntax.name}.dcm"
            save(copy.deepcopy(ds), path, syntax)
            out[(vendor.machine_id, syntax)] = path.read_bytes()
        require_tool("ojph_compress")  # HTJ2K lossless, as OpenJPH writes it
        pixels = ds.pixel_array.astype(np.uint16)
        htj2k = encapsulated(copy.deepcopy(ds), htj2k_codestream(pixels, int(ds.BitsStored), "-reversible", "true"),
                             HTJ2KLossless)
        buffer = io.BytesIO()
        htj2k.save_as(buffer, enforce_file_format=True)
        out[(vendor.machine_id, HTJ2KLossless)] = buffer.getvalue()
        implicit = pydicom.dcmread(path.with_name(f"{vendor.machine_id}-{ExplicitVRLittleEndian.name}.dcm"))
        implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        buffer = io.BytesIO()
        implicit.save_as(buffer, implicit_vr=True, little_endian=True)
        out[(vendor.machine_id, ImplicitVRLittleEndian)] = buffer.getvalue()
    return out


@pytest.fixture
def decoders(monkeypatch) -> list[str]:
    """The reduced decoders the read of the whole file runs (not the ones run ahead)."""
    calls = []
    real_opj, real_lowpass = resolution.openjpeg, dicom_io.lowpass
    monkeypatch.setattr(resolution, "openjpeg", lambda *a: calls.append("openjpeg") or real_opj(*a))
    monkeypatch.setattr(dicom_io, "lowpass", lambda *a, **k: calls.append("lowpass") or real_lowpass(*a, **k))
    monkeypatch.setattr(read_ahead, "openjpeg", real_opj)  # run ahead: not counted
    return calls


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, HTJ2KLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                         ids=["JPEG 2000", "HTJ2K", "explicit VR", "implicit VR"])
def test_what_is_read_while_the_file_arrives_is_what_the_whole_file_reads(files, decoders, syntax):
    for vendor in VENDORS:
        data = files[(vendor.machine_id, syntax)]
        feed = Feed(data)
        ahead = decode_ahead(feed, len(data), LONG_SIDE)
        feed.thread.join()
        assert ahead is not None, vendor.machine_id
        expected, meta = read_dicom(data, long_side=LONG_SIDE)
        decoders.clear()
        pixels, read_meta = read_dicom(feed.view, long_side=LONG_SIDE, ahead=lambda a=ahead: a)
        assert decoders == [], vendor.machine_id  # taken from what was read ahead
        np.testing.assert_array_equal(pixels, expected)
        assert pixels.dtype == expected.dtype and read_meta == meta


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, HTJ2KLossless], ids=["JPEG 2000", "HTJ2K"])
def test_a_long_reduced_decode_is_neither_read_ahead_nor_run_beside_the_event_loop(files, syntax):
    """OpenJPEG through Pillow holds the GIL for the whole of a decode: at 1/8 of 2048 x 1664 (53 k pixels) that is
    short and runs in the service's thread (ahead of the body's end too); at 1/2 (852 k pixels: a review UI's
    rendering) it would stop the event loop, so it is not read ahead and a GIL-free read hands it on."""
    from medvision.dicom_io import DecodeElsewhere

    data = files[(VENDORS[0].machine_id, syntax)]
    for long_side, short in ((256, True), (1024, False)):
        assert resolution.lets_threads_run(syntax, long_side) == (long_side <= resolution.J2K_IN_THREAD_LONG_SIDE)
        feed = Feed(data)
        ahead = decode_ahead(feed, len(data), long_side)
        feed.thread.join()
        assert (ahead is not None) == short, long_side
        if short:
            got, meta = read_dicom(data, long_side=long_side, gil_free_only=True)
            expected, expected_meta = read_dicom(data, long_side=long_side)
            np.testing.assert_array_equal(got, expected)
            assert meta == expected_meta and meta.decode == "1/8 wavelet"
        else:
            with pytest.raises(DecodeElsewhere, match="1/2 of 2048 x 1664"):
                read_dicom(data, long_side=long_side, gil_free_only=True)
            assert read_dicom(data, long_side=long_side)[1].decode == "1/2 wavelet"  # elsewhere: decoded as ever


def test_an_uncompressed_band_is_computed_as_its_rows_arrive(files):
    data = files[(VENDORS[0].machine_id, ExplicitVRLittleEndian)]
    asked = []
    feed = Feed(data, pause_s=0.001)

    def arriving(n):
        asked.append((n, feed.at))
        return feed(n)

    arriving.view = feed.view
    ahead = decode_ahead(arriving, len(data), LONG_SIDE)
    feed.thread.join()
    assert ahead is not None and ahead.cut is None
    waits = [n for n, _ in asked][2:]  # (after the header's)
    assert len(waits) > 10 and waits == sorted(waits)  # strip after strip, each waiting only for its own rows
    assert sum(1 for n, at in asked if at < n) > 5  # and they were waited for: the band kept up with the arrival


def test_what_was_read_from_other_bytes_is_not_taken(files, decoders):
    """Pixels read ahead from another file (JPEG 2000: another cut codestream), or from the same stored values at
    another address (uncompressed: a copy), are not used: the file is decoded as without them."""
    a, b = (files[(v.machine_id, JPEG2000Lossless)] for v in VENDORS[:2])
    ahead = decode_ahead(Feed(a), len(a), LONG_SIDE)
    pixels, _ = read_dicom(b, long_side=LONG_SIDE, ahead=lambda: ahead)
    assert decoders == ["openjpeg"]
    np.testing.assert_array_equal(pixels, read_dicom(b, long_side=LONG_SIDE)[0])
    decoders.clear()
    data = files[(VENDORS[0].machine_id, ExplicitVRLittleEndian)]
    feed = Feed(data)
    ahead = decode_ahead(feed, len(data), LONG_SIDE)
    feed.thread.join()
    copied = bytearray(feed.view)  # the same bytes elsewhere
    pixels, _ = read_dicom(memoryview(copied), long_side=LONG_SIDE, ahead=lambda: ahead)
    assert decoders == ["lowpass"]
    np.testing.assert_array_equal(pixels, ahead.pixels)
    decoders.clear()
    _, meta = read_dicom(feed.view, long_side=LONG_SIDE * 2, ahead=lambda: ahead)  # another level: 1/8
    assert decoders == ["lowpass"] and meta.decode == "1/8 lowpass"


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless], ids=["RLE", "JPEG-LS"])
def test_files_without_levels_to_skip_are_not_read_ahead(files, syntax):
    data = files[(VENDORS[0].machine_id, syntax)]
    assert decode_ahead(Feed(data), len(data), LONG_SIDE) is None


def test_a_body_that_stops_short_is_refused_as_without_reading_ahead(files):
    """Stopped before the bytes it needs, nothing is read ahead; past them (a JPEG 2000 file's kept packets come in
    its first tens of kilobytes) the pixels are, and the truncated file is refused all the same, as it was."""
    for syntax in (JPEG2000Lossless, ExplicitVRLittleEndian):
        data = files[(VENDORS[0].machine_id, syntax)]
        for stop_at in (100, 1000, 40000, len(data) // 2):
            feed = Feed(data, stop_at=stop_at)
            ahead = decode_ahead(feed, len(data), LONG_SIDE)
            assert (ahead is not None) == (syntax == JPEG2000Lossless and stop_at == len(data) // 2), (syntax, stop_at)
            refusals = []
            for given in (None, ahead):
                with pytest.raises(MedvisionError) as refused:
                    read_dicom(feed.view[:stop_at], long_side=LONG_SIDE, ahead=given and (lambda g=given: g))
                refusals.append((type(refused.value), str(refused.value)))
            assert refusals[0] == refusals[1], (syntax, stop_at)
    data = files[(VENDORS[0].machine_id, JPEG2000Lossless)]
    assert decode_ahead(Feed(data), len(data), 0) is None  # a contract that reads every pixel: nothing to skip


def test_garbage_and_files_the_read_refuses_read_nothing_ahead(files):
    data = files[(VENDORS[0].machine_id, JPEG2000Lossless)]
    wider = bytearray(data)
    at = wider.index(b"\xff\x4f\xff\x51")  # SOC, SIZ: the codestream declares another width than the header
    wider[at + 8:at + 12] = (4096).to_bytes(4, "big")
    bad = {"no DICOM": bytes(len(data)), "a codestream wider than the header says": bytes(wider)}
    for name, body in bad.items():
        assert decode_ahead(Feed(body), len(body), LONG_SIDE) is None, name


def test_a_header_that_changes_past_the_pixel_data_reads_as_without_reading_ahead(files, decoders):
    """An element after the pixel data that repeats Bits Stored (pydicom keeps the later one): read ahead, the band
    was clamped to the first value, so the read of the whole file computes its own."""
    data = files[(VENDORS[0].machine_id, ExplicitVRLittleEndian)]
    changed = data + b"\x28\x00\x01\x01US\x02\x00" + (16).to_bytes(2, "little")  # (0028,0101) US 16
    feed = Feed(changed)
    ahead = decode_ahead(feed, len(changed), LONG_SIDE)
    feed.thread.join()
    assert ahead is not None
    expected, expected_meta = read_dicom(changed, long_side=LONG_SIDE)
    decoders.clear()
    pixels, meta = read_dicom(feed.view, long_side=LONG_SIDE, ahead=lambda: ahead)
    assert decoders == ["lowpass"] and meta.bits_stored == expected_meta.bits_stored == 16
    np.testing.assert_array_equal(pixels, expected)
