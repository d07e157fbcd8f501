"""The decode-once cache: same pixels as decoding directly, decoded once, invalidated when a file changes."""

import os
import shutil

import numpy as np
import pytest

import medvision.cache as cache_mod
from medvision.cache import ImageCache, decode_many, fingerprint
from medvision.preprocess import Preprocess, PreprocessConfig


@pytest.fixture
def pre():
    return Preprocess(PreprocessConfig(image_size=64))


@pytest.fixture
def files(dicom_files, tmp_path):
    out = []
    for f in dicom_files[:6]:
        shutil.copy(f, tmp_path / f.name)
        out.append(str(tmp_path / f.name))
    (tmp_path / "broken.dcm").write_bytes(b"DICM nonsense")
    out.insert(2, str(tmp_path / "broken.dcm"))
    return out


def _direct(pre, path):
    return pre.display(*pre.read(path))


def test_cached_pixels_equal_direct_decoding_and_are_reused(pre, files, tmp_path, monkeypatch):
    cache = ImageCache(pre, tmp_path / "cache")
    images, kept, errors = cache.load(files, workers=1, show_progress=False)
    assert kept == [0, 1, 3, 4, 5, 6] and set(errors) == {2} and "not_dicom" in errors[2]
    for j, i in enumerate(kept):
        np.testing.assert_array_equal(images[j], _direct(pre, files[i]))
    assert images.shape == (6, 64, 64) and isinstance(images._shards[next(iter(images._shards))], np.memmap)

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "iter_decode", boom)
    again, kept2, errors2 = ImageCache(pre, tmp_path / "cache").load(files, show_progress=False)
    assert kept2 == kept and errors2 == errors  # the failure is remembered, not retried
    np.testing.assert_array_equal(again.to_array(), images.to_array())


def test_a_changed_file_is_decoded_again(pre, files, tmp_path, dicom_files):
    cache = ImageCache(pre, tmp_path / "cache")
    before, _, _ = cache.load(files[:2], workers=1, show_progress=False)
    shutil.copy(dicom_files[10], files[0])  # new content under the same name
    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    after, _, _ = cache.load(files[:2], workers=1, show_progress=False)
    np.testing.assert_array_equal(after[0], _direct(pre, files[0]))
    assert not np.array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_another_preprocessing_uses_another_cache(pre, files, tmp_path):
    other = Preprocess(PreprocessConfig(image_size=48))
    assert fingerprint(pre.cfg) != fingerprint(other.cfg)
    a, _, _ = ImageCache(pre, tmp_path / "c").load(files[:1], workers=1, show_progress=False)
    b, _, _ = ImageCache(other, tmp_path / "c").load(files[:1], workers=1, show_progress=False)
    assert a.shape[1:] == (64, 64) and b.shape[1:] == (48, 48)


def test_the_cache_decodes_under_the_preprocessing_contract(files, tmp_path):
    reduced = Preprocess(PreprocessConfig(image_size=64, decode_long_side=96))  # 256-row images at half size
    assert fingerprint(reduced.cfg) != fingerprint(PreprocessConfig(image_size=64))
    images, kept, _ = ImageCache(reduced, tmp_path / "c").load(files[:2], workers=1, show_progress=False)
    for j, i in enumerate(kept):
        stored, meta = reduced.read(files[i])
        assert meta.decode_factor == 2
        np.testing.assert_array_equal(images[j], reduced.display(stored, meta))


def test_processes_threads_and_serial_decode_agree(pre, files):
    serial = decode_many(files, pre, workers=1, show_progress=False)
    for kind in ("process", "thread"):
        parallel = decode_many(files, pre, workers=2, kind=kind, show_progress=False)
        assert [e for _, e in parallel] == [e for _, e in serial]
        for (a, _), (b, _) in zip(parallel, serial, strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


def test_an_interrupted_shard_leaves_no_trace(pre, files, tmp_path, monkeypatch):
    def dies(paths, *a, **k):
        yield from ((_direct(pre, p), "") for p in paths[:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "iter_decode", dies)
    cache = ImageCache(pre, tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        cache.load(files[:3], workers=1, show_progress=False)
    assert list(cache.dir.iterdir()) == []


def test_environment_failures_are_retried_not_remembered(pre, files, tmp_path, monkeypatch):
    calls = []

    def no_codec(paths, *a, **k):
        calls.append(len(paths))
        yield from ((None, "missing_codec: install pylibjpeg") for _ in paths)

    monkeypatch.setattr(cache_mod, "iter_decode", no_codec)
    cache = ImageCache(pre, tmp_path / "cache")
    _, kept, errors = cache.load(files[:2], workers=1, show_progress=False)
    assert kept == [] and errors == {0: "missing_codec: install pylibjpeg", 1: "missing_codec: install pylibjpeg"}
    cache.load(files[:2], workers=1, show_progress=False)
    assert calls == [2, 2]  # tried again: the codec may have been installed since
