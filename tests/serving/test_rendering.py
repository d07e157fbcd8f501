"""The review UI's decoded images in memory (``DecodedImages``): each image decoded once for its presets, renderings,
heatmap and window changes, the same pixels and PNGs as decoding afresh, bounded, never handed out writable."""

import copy
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless

from medvision.dicom_io import ReadLimits, read_dicom
from medvision.preprocess import PreprocessConfig
from medvision.serving import rendering
from medvision.serving.engine import Engine
from medvision.serving.rendering import DecodedImages, image_info, render, render_heatmap
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import save
from medvision.synth.vendors import VENDORS


@pytest.fixture(scope="module")
def j2k(tmp_path_factory):
    """A 1024 x 832 JPEG 2000 lossless view: rendered at 512 px from its 1/2 wavelet band."""
    path = tmp_path_factory.mktemp("rendering") / "view.dcm"
    save(example_image(VENDORS[0], 1024, 832, seed=3), path, JPEG2000Lossless)
    return path


@pytest.fixture
def counted(monkeypatch):
    """The decodes ``rendering`` makes, by (file name, long side)."""
    calls = []

    def counting(path, limits=ReadLimits(), identifiers=None, long_side=0):
        calls.append((str(path).rsplit("/", 1)[-1], long_side))
        return read_dicom(path, limits, identifiers, long_side=long_side)

    monkeypatch.setattr(rendering, "read_dicom", counting)
    return calls


def test_an_image_is_decoded_once_for_its_presets_renderings_and_window_changes(j2k, counted):
    images, limits, cfg = DecodedImages(64 << 20), ReadLimits(), PreprocessConfig()
    fresh = [json_of(image_info(j2k, limits)), render(j2k, limits, cfg, 512), render(j2k, limits, cfg, 512, 900, 1500)]
    counted.clear()
    cached = [json_of(image_info(j2k, limits, images)), render(j2k, limits, cfg, 512, images=images),
              render(j2k, limits, cfg, 512, 900, 1500, images)]
    assert cached == fresh  # the same presets and PNGs, byte for byte
    assert counted == [("view.dcm", 1024), ("view.dcm", 512)]  # one decode per resolution, not one per rendering
    render(j2k, limits, cfg, 512, 1200, 800, images)  # a window change: no decode
    assert len(counted) == 2
    stored, meta = images.read(j2k, limits, 512)
    expected, expected_meta = read_dicom(j2k, limits, long_side=512)
    np.testing.assert_array_equal(stored, expected)
    assert meta == expected_meta and meta.decode == "1/2 wavelet"
    with pytest.raises(ValueError, match="read-only"):
        stored[0, 0] = 1  # shared by every request: no consumer may write into it


def json_of(info: dict) -> str:
    return json.dumps(info, sort_keys=True)


def test_the_heatmap_reuses_the_decodes_and_draws_the_same_png(artifact, dicom_files, counted):
    engine = Engine(artifact)
    assert engine.has_heatmap
    path = dicom_files[0]
    fresh = render_heatmap(engine, path, 1024)
    images = DecodedImages(64 << 20)
    render(path, engine.limits, engine.preprocess.cfg, 1024, images=images)
    counted.clear()
    assert render_heatmap(engine, path, 1024, images) == fresh
    assert render_heatmap(engine, path, 1024, images) == fresh
    # the display's decode was there already; the model's (at its contract) is made once
    assert counted == [(path.name, engine.preprocess.cfg.decode_long_side)]


def test_a_file_replaced_is_decoded_afresh(j2k, dicom_files, tmp_path, counted):
    path = tmp_path / "image.dcm"
    shutil.copy(dicom_files[0], path)
    images = DecodedImages(64 << 20)
    first, _ = images.read(path, ReadLimits(), 256)
    time.sleep(0.01)
    shutil.copy(dicom_files[1], path)  # the same name, another image (a study sent again)
    second, _ = images.read(path, ReadLimits(), 256)
    np.testing.assert_array_equal(second, read_dicom(dicom_files[1], long_side=256)[0])
    assert not np.array_equal(first, second) and len(counted) == 2


def test_memory_is_bounded_least_recently_used_first(dicom_files, counted):
    one = read_dicom(dicom_files[0], long_side=256)[0].nbytes + DecodedImages.ENTRY_BYTES
    images = DecodedImages(2 * one + one // 2)  # room for two such images
    for f in dicom_files[:3]:
        images.read(f, ReadLimits(), 256)
    assert images.size <= images.max_bytes and len(images._items) == 2
    counted.clear()
    images.read(dicom_files[2], ReadLimits(), 256)  # kept
    images.read(dicom_files[0], ReadLimits(), 256)  # dropped first: decoded again
    assert counted == [(dicom_files[0].name, 256)]
    none = DecodedImages(0)
    none.read(dicom_files[0], ReadLimits(), 256)
    none.read(dicom_files[0], ReadLimits(), 256)
    assert none.size == 0 and not none._items


def test_requests_for_the_same_image_at_once_decode_it_once(j2k, monkeypatch):
    started, release, calls = threading.Event(), threading.Event(), []

    def slow(path, limits=ReadLimits(), identifiers=None, long_side=0):
        calls.append(long_side)
        started.set()
        release.wait(10)
        return read_dicom(path, limits, identifiers, long_side=long_side)

    monkeypatch.setattr(rendering, "read_dicom", slow)
    images, got = DecodedImages(64 << 20), []
    threads = [threading.Thread(target=lambda: got.append(images.read(j2k, ReadLimits(), 512))) for _ in range(4)]
    for t in threads:
        t.start()
    assert started.wait(10)
    time.sleep(0.2)  # the other three are waiting for the first decode, not decoding
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [512] and len(got) == 4 and all(g[0] is got[0][0] for g in got)


def test_a_decode_that_fails_fails_every_waiter_and_keeps_no_pixels(tmp_path, monkeypatch):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    images = DecodedImages(64 << 20)
    for _ in range(2):  # the same refusal each time (the second from memory: the file has not changed)
        with pytest.raises(Exception) as refused:
            images.read(bad, ReadLimits(), 512)
        assert type(refused.value).__module__.startswith("medvision")
    assert not images._items and not images._loading and len(images._refused) == 1
    # requests waiting on a decode that fails share its refusal: one decode, not one after another
    images = DecodedImages(64 << 20)
    started, release, calls, outcomes = threading.Event(), threading.Event(), [], []

    def slow(path, limits=ReadLimits(), identifiers=None, long_side=0):
        calls.append(long_side)
        started.set()
        release.wait(10)
        return read_dicom(path, limits, identifiers, long_side=long_side)

    def one():
        try:
            images.read(bad, ReadLimits(), 512)
        except Exception as exc:  # noqa: BLE001 - the refusal is what is compared
            outcomes.append(exc)

    monkeypatch.setattr(rendering, "read_dicom", slow)
    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(10)
    time.sleep(0.2)
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [512] and len(outcomes) == 3 and len({type(e) for e in outcomes}) == 1
    assert not images._items and not images._loading


def test_an_image_too_large_to_keep_is_shared_with_its_waiters_not_kept(dicom_files):
    one = read_dicom(dicom_files[0], long_side=256)[0].nbytes
    small = DecodedImages(one // 2)
    stored, _ = small.read(dicom_files[0], ReadLimits(), 256)
    assert not stored.flags.writeable and small.size == 0 and not small._items
    unbounded = DecodedImages(0)  # keeps nothing, and still hands out read-only arrays
    assert not unbounded.read(dicom_files[0], ReadLimits(), 256)[0].flags.writeable


def test_a_view_whose_decoder_holds_the_gil_is_decoded_by_a_worker_and_gives_the_same_pixels(tmp_path):
    """With a pool (``elsewhere``), a full-size JPEG 2000 decode (pydicom's plugins) and a reduced one of more than
    ``J2K_IN_THREAD_PIXELS`` (OpenJPEG through Pillow holds the GIL throughout) go to a worker process, where holding
    the GIL stops nothing of the service's (the full-size one whatever the file meta's hint says; the header's check
    of a reduced one: tests/medvision/test_read_ahead.py); uncompressed pixels, a short reduced
    JPEG 2000 decode, JPEG-LS and RLE (imagecodecs) are decoded in the calling thread. The pixels and metadata are
    those of ``read_dicom`` either way, and cached the same way; a file refused is refused by name either way."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

    from medvision.serving.decode_pool import DecodePool

    ds = example_image(VENDORS[1], 1024, 832, seed=4)
    files = {}
    for syntax in (ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, JPEG2000Lossless):
        files[syntax] = tmp_path / f"{syntax.name}.dcm"
        save(copy.deepcopy(ds), files[syntax], syntax)
    limits = ReadLimits()
    pool = DecodePool(PreprocessConfig(), limits, 1)
    away = []
    try:
        images = DecodedImages(64 << 20, lambda *a: away.append((a[0].name, a[2])) or pool.read(*a))
        # a decoy Transfer Syntax UID ahead of the real one: the hint says uncompressed, the file is JPEG 2000
        decoy = tmp_path / "decoy.dcm"
        real = files[JPEG2000Lossless].read_bytes()
        decoy.write_bytes(real[:132] + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00" + real[132:])
        files["decoy"] = decoy
        for path in files.values():
            # 512: JPEG 2000 at 1/2 (213 k pixels, short); 2048: no smaller than the image, so a JPEG 2000 decode is
            # full size
            for long_side in (512, 0, 2048):
                stored, meta = images.read(path, limits, long_side)
                expected, expected_meta = read_dicom(path, limits, long_side=long_side)
                np.testing.assert_array_equal(stored, expected)
                assert meta == expected_meta and not stored.flags.writeable
        assert sorted(away) == sorted([(f.name, long_side) for f in (files[JPEG2000Lossless], decoy)
                                       for long_side in (0, 2048)])
        images.read(files[JPEG2000Lossless], limits, 0)  # kept: not decoded again
        assert len(away) == 4
        # a view at 1/2 of 2048 x 1664 (852 k pixels): a reduced decode too long to hold the GIL beside the loop
        large = tmp_path / "large.dcm"
        save(example_image(VENDORS[1], 2048, 1664, seed=4), large, JPEG2000Lossless)
        for long_side in (1024, 256):  # 256: at 1/8, 53 k pixels, in the calling thread
            stored, meta = images.read(large, limits, long_side)
            expected, expected_meta = read_dicom(large, limits, long_side=long_side)
            np.testing.assert_array_equal(stored, expected)
            assert meta == expected_meta and "wavelet" in meta.decode
        assert away[4:] == [("large.dcm", 1024)]
        for syntax, where in ((JPEGLSLossless, []), (JPEG2000Lossless, [("broken.dcm", 0)])):
            broken = tmp_path / "broken.dcm"
            broken.write_bytes(files[syntax].read_bytes()[:-4000])
            away.clear()
            with pytest.raises(Exception, match="truncated|end-of-image") as refused:
                images.read(broken, limits, 0)
            assert getattr(refused.value, "code", "")  # a MedvisionError, named as the reader names it
            assert away == where
    finally:
        pool.close()


def test_a_files_refusal_is_remembered_while_it_stays_the_same_a_busy_service_is_not(j2k, tmp_path):
    """A view whose decoder crashes (its worker dies) is refused again from memory, not decoded again at every page
    the reader opens (each time killing a worker); a file replaced since is decoded afresh; a refusal that is the
    service's state (no worker free, shutting down), not the file's, is not remembered."""
    from medvision.serving.batcher import TimedOut
    from medvision.serving.decode_pool import DecoderCrashed

    path = tmp_path / "view.dcm"
    # a JPEG 2000 view read at its full size (pydicom's plugins, which hold the GIL): decoded by a worker
    save(example_image(VENDORS[0], 512, 416, seed=6), path, JPEG2000Lossless)
    calls, outcome = [], [DecoderCrashed("the image decoder crashed on this file")]

    def elsewhere(*args):
        calls.append(args)
        raise outcome[0]

    images, limits = DecodedImages(64 << 20, elsewhere), ReadLimits()
    for _ in range(3):
        with pytest.raises(DecoderCrashed, match="crashed"):
            images.read(path, limits, 0)
    assert len(calls) == 1
    path.write_bytes(path.read_bytes())  # the same bytes written again: another modification time
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(DecoderCrashed):
        images.read(path, limits, 0)
    assert len(calls) == 2
    outcome[0] = TimedOut("no decoding worker free")
    for _ in range(2):
        with pytest.raises(TimedOut):
            images.read(path, limits, 1024)
    assert len(calls) == 4
