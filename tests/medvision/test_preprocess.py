"""The shared preprocessing path: DICOM grey-scale semantics checked against pydicom's reference."""

import io

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut

from medvision.dicom_io import read_dicom
from medvision.errors import PreprocessError
from medvision.preprocess import (
    Preprocess,
    PreprocessConfig,
    apply_window,
    needs_inversion,
    orient_chest_wall_left,
    resize_pad,
    to_display,
)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # pydicom's reference sigmoid
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("center,width", [(2048, 4096), (1000, 301), (40.5, 1.5)])
def test_window_matches_pydicom(function, center, width):
    values = np.linspace(-500, 4600, 2001).astype(np.float32)
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 16
    ds.PixelRepresentation = 1
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    ref = apply_voi_lut(values.astype(np.float64), ds, prefer_lut=False)
    # pydicom maps to the stored value range [-32768, 32767]; bring it to [0, 1].
    ref = (ref + 32768.0) / 65535.0
    np.testing.assert_allclose(apply_window(values, center, width, function), ref, atol=2e-5)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("center,width", [(0.0, 6.805647135594673e38), (-1e308, 1e308), (1e308, 1e308),
                                          (5.0, 1e-300), (3e38, 2.0)])
def test_windows_beyond_float32_give_the_float64_answer_not_nan(function, center, width):
    """A header may declare any finite window; one float32 cannot hold (or divide by) is computed in float64: what the
    window means, never NaN (a width of 6.8e38 once gave inf / inf)."""
    if function == "LINEAR" and width < 1:
        return
    values = np.linspace(-500, 4600, 101).astype(np.float32)
    out = apply_window(values, center, width, function)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    v = values.astype(np.float64)  # PS3.3 C.11.2.1.2, in float64
    with np.errstate(over="ignore"):
        ref = {"LINEAR": lambda: (v - (center - 0.5)) / (width - 1) + 0.5,
               "LINEAR_EXACT": lambda: (v - center) / width + 0.5,
               "SIGMOID": lambda: 1 / (1 + np.exp(-4 * ((v - center) / width)))}[function]()
    np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-6)


def _twin_monochrome1(path) -> bytes:
    """The same image stored inverted as MONOCHROME1 with the window mirrored."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    top = (1 << ds.BitsStored) - 1
    arr = ds.pixel_array
    if ds.PhotometricInterpretation == "MONOCHROME1":
        ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME2", "IDENTITY"
    else:
        ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME1", "INVERSE"
    ds.PixelData = (top - arr).astype("<u2").tobytes()
    ds.WindowCenter = top - float(ds.WindowCenter)
    ds.VOILUTFunction = "LINEAR_EXACT"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_monochrome1_and_its_monochrome2_twin_look_the_same(dicom_files):
    cfg = PreprocessConfig()
    for path in dicom_files[:4]:
        a_stored, a_meta = read_dicom(path)
        b_stored, b_meta = read_dicom(_twin_monochrome1(path))
        assert {a_meta.photometric, b_meta.photometric} == {"MONOCHROME1", "MONOCHROME2"}
        a_meta_exact = a_meta.__class__(**{**a_meta.__dict__, "voi_lut_function": "LINEAR_EXACT"})
        a = to_display(a_stored, a_meta_exact, cfg)
        b = to_display(b_stored, b_meta, cfg)
        np.testing.assert_allclose(a, b, atol=1e-3)
        # bright = dense tissue for both: the breast is brighter than the air around it
        assert a[a_stored.shape[0] // 2].max() > 0.3 and min(a[:, :2].mean(), a[:, -2:].mean()) < a.mean()


def test_inversion_rules():
    assert needs_inversion("MONOCHROME1", "INVERSE")  # INVERSE declares MONOCHROME1's inversion, no double flip
    assert needs_inversion("MONOCHROME1", None)
    assert not needs_inversion("MONOCHROME2", "IDENTITY")
    assert needs_inversion("MONOCHROME2", "INVERSE")


def test_orientation_makes_left_and_right_breasts_alike():
    img = np.zeros((40, 30), np.float32)
    img[5:35, :12] = 1.0  # tissue against the left edge
    np.testing.assert_array_equal(orient_chest_wall_left(img), img)
    np.testing.assert_array_equal(orient_chest_wall_left(img[:, ::-1]), img)


def test_resize_pad_keeps_aspect_and_pads_with_air():
    img = np.ones((200, 100), np.float32)
    out = resize_pad(img, 64)
    assert out.shape == (64, 64)
    assert np.allclose(out[:, :32], 1.0, atol=1e-5) and np.all(out[:, 33:] == 0)


def test_resize_pad_takes_another_filter_only_when_asked():
    """The decode-contract benchmark's control resizes with other filters; the preprocessing's stays bilinear."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.random((300, 240)).astype(np.float32)
    bilinear = np.asarray(Image.fromarray(img, mode="F").resize((51, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_pad(img, 64)[:, :51], bilinear)
    box = resize_pad(img, 64, Image.Resampling.BOX)
    assert box.shape == (64, 64) and np.all(box[:, 51:] == 0)
    assert np.abs(box[:, :51] - bilinear).max() > 1e-3


def test_preprocess_output_contract(dicom_files):
    pre = Preprocess(PreprocessConfig(image_size=96, mean=0.5, std=0.25))
    x, meta = pre.from_dicom(dicom_files[0])
    assert x.shape == (1, 96, 96) and x.dtype == np.float32
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-6 and x.max() <= (1 - 0.5) / 0.25 + 1e-6
    stored, _ = read_dicom(dicom_files[0])
    np.testing.assert_array_equal(pre(stored, meta), x)  # deterministic


def test_failing_step_is_named_with_shape_and_range(dicom_files):
    stored, meta = read_dicom(dicom_files[0])
    bad = meta.__class__(**{**meta.__dict__, "window_widths": (0.5,), "window_centers": (10.0,)})
    with pytest.raises(PreprocessError) as info:
        Preprocess()(stored, bad)
    assert "to_display" in info.value.message and str(stored.shape) in info.value.message


def test_geometry_maps_stored_pixels_into_the_model_input(dicom_files):
    """A bright dot written into the stored pixels lands where Geometry says, through crop, flip and resize."""
    from medvision.dicom_io import read_dicom
    from medvision.preprocess import Preprocess, PreprocessConfig

    pre = Preprocess(PreprocessConfig(image_size=128))
    for f in dicom_files[:6]:  # both lateralities: with and without the flip
        stored, meta = read_dicom(f)
        grey = pre.display(stored, meta)
        geom = pre.geometry(stored, meta)
        assert geom.size == 128
        ys, xs = np.nonzero(grey[:, :] > 0.3)
        y0, x0 = int(np.median(ys)), int(np.median(xs))  # a pixel inside the breast, in input coordinates
        # find the stored pixel that maps there and mark it
        t, b, left, right = geom.box
        sx = (right - left) - x0 / geom.scale if geom.flipped else x0 / geom.scale
        sy = (y0 - geom.top_pad) / geom.scale
        marked = stored.copy()
        r0, c0 = int(t + sy), int(left + sx)
        marked[max(r0 - 3, 0):r0 + 4, max(c0 - 3, 0):c0 + 4] = marked.max() if meta.photometric == "MONOCHROME2" else marked.min()
        diff = np.abs(pre.display(marked, meta) - grey)
        py, px = np.unravel_index(int(np.argmax(diff)), diff.shape)
        ex, ey = geom.to_input(c0 + 0.5, r0 + 0.5)
        assert abs(px + 0.5 - ex) <= 2 and abs(py + 0.5 - ey) <= 2, (f.name, (px, py), (ex, ey))


def test_table_lookup_display_is_bit_identical_to_the_float_chain(dicom_files):
    """8/16-bit pixels with a window or VOI LUT are displayed through a per-value table: it must give exactly
    the float chain's greys (synthetic files of every vendor, and signed pixels with rescale, sigmoid VOI,
    a modality LUT and a VOI LUT sequence)."""
    import dataclasses

    from pydicom.data import get_testdata_file

    from medvision.dicom_io import Lut
    from medvision.preprocess import PreprocessConfig, _display_chain, to_display

    cfg = PreprocessConfig()
    for f in dicom_files[::3]:
        stored, meta = read_dicom(f)
        assert np.array_equal(to_display(stored, meta, cfg), _display_chain(stored, meta, cfg)), f
    for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm"):
        path = get_testdata_file(name)
        if path is None:
            continue
        stored, meta = read_dicom(path)
        assert np.array_equal(to_display(stored, meta, cfg), _display_chain(stored, meta, cfg)), name
    rng = np.random.default_rng(0)
    stored = rng.integers(-2000, 3000, size=(64, 48)).astype(np.int16)
    _, base = read_dicom(dicom_files[0])
    variants = [
        dict(rescale_slope=0.5, rescale_intercept=-1024.0, window_centers=(40.0,), window_widths=(400.0,)),
        dict(window_centers=(100.0,), window_widths=(700.0,), voi_lut_function="SIGMOID", photometric="MONOCHROME1"),
        dict(window_centers=(0.0,), window_widths=(1000.0,), voi_lut_function="LINEAR_EXACT"),
        dict(window_centers=(), window_widths=(), modality_lut=Lut(-2000, 12, np.linspace(0, 4095, 5001)),
             voi_lut=Lut(0, 8, np.linspace(0, 255, 4096).round())),
    ]
    for v in variants:
        meta = dataclasses.replace(base, **v)
        assert np.array_equal(to_display(stored, meta, cfg), _display_chain(stored, meta, cfg)), v


def _reference_box(stored, meta, cfg):
    """The box as the whole float chain finds it, on the low-pass band whose long side is at least
    ``crop_long_side`` (else ``image_size``; 0: the pixels as decoded), in the decoded pixels."""
    from medvision.preprocess import _display_chain
    from medvision.resolution import lowpass, reduction

    long_side = cfg.image_size if cfg.crop_long_side is None else cfg.crop_long_side
    k = reduction(meta.rows, meta.columns, long_side) // meta.decode_factor if long_side else 1
    small = lowpass(stored, k.bit_length() - 1, meta.bits_stored, meta.signed)
    mask = _display_chain(small, meta, cfg) > 0.08
    rows, cols = np.flatnonzero(mask.mean(axis=1) > 0.01), np.flatnonzero(mask.mean(axis=0) > 0.01)
    h, w = stored.shape
    if not cfg.crop_to_breast or not (rows.size and cols.size):
        return 0, h, 0, w
    return int(rows[0]) * k, min(h, (int(rows[-1]) + 1) * k), int(cols[0]) * k, min(w, (int(cols[-1]) + 1) * k)


def _reference_preprocess(stored, meta, cfg):
    """The pipeline as first written: the whole image through the float chain, then crop (mean-based box),
    orient, resize, normalise. ``Preprocess`` crops before its table lookup and must give exactly this."""
    from medvision.preprocess import _display_chain, normalize, orient_chest_wall_left, resize_pad

    top, bottom, left, right = _reference_box(stored, meta, cfg)
    grey = _display_chain(stored, meta, cfg)[top:bottom, left:right]
    if cfg.orientation == "chest_wall_left":
        grey = orient_chest_wall_left(grey)
    return normalize(resize_pad(grey, cfg.image_size), cfg.mean, cfg.std)[None]


def test_cropping_before_the_lookup_is_bit_identical_to_the_whole_image_chain(dicom_files):
    """The box is found on the stored values (a cut value when the chain is monotone, a boolean table when it
    is not) and only the box is looked up: same model input, bit for bit, and the same geometry."""
    import dataclasses

    from medvision.dicom_io import Lut
    from medvision.preprocess import Preprocess, PreprocessConfig

    configs = [PreprocessConfig(image_size=96), PreprocessConfig(image_size=64, crop_to_breast=False),
               PreprocessConfig(image_size=80, orientation="none", voi="percentile"),
               PreprocessConfig(image_size=96, crop_long_side=0),  # the box on the decoded pixels
               PreprocessConfig(image_size=64, crop_long_side=0, voi="percentile")]
    for f in dicom_files:
        stored, meta = read_dicom(f)
        for cfg in configs:
            np.testing.assert_array_equal(Preprocess(cfg)(stored, meta), _reference_preprocess(stored, meta, cfg))
            assert Preprocess(cfg).geometry(stored, meta).box == _reference_box(stored, meta, cfg)
    # signed pixels with a breast-like bright region on air, every VOI flavour, and a non-monotone VOI LUT
    rng = np.random.default_rng(1)
    stored = rng.integers(-1500, -900, size=(120, 90)).astype(np.int16)
    stored[20:100, 5:60] = rng.integers(-300, 2500, size=(80, 55))
    _, base = read_dicom(dicom_files[0])
    bump = (np.sin(np.linspace(0, 6 * np.pi, 4096)) * 120 + 128).round()
    variants = [
        dict(rescale_slope=0.5, rescale_intercept=-1024.0, window_centers=(40.0,), window_widths=(400.0,)),
        dict(window_centers=(100.0,), window_widths=(700.0,), voi_lut_function="SIGMOID", photometric="MONOCHROME1"),
        dict(window_centers=(0.0,), window_widths=(1000.0,), voi_lut_function="LINEAR_EXACT"),
        dict(window_centers=(), window_widths=(), modality_lut=Lut(-2000, 12, np.linspace(0, 4095, 5001)),
             voi_lut=Lut(0, 8, bump)),
        dict(window_centers=(-5000.0,), window_widths=(10.0,)),  # every pixel white: no cut, the whole image
        dict(window_centers=(9000.0,), window_widths=(10.0,)),  # every pixel air: no box, the whole image
    ]
    boxes = []
    for v in variants:
        meta = dataclasses.replace(base, rows=120, columns=90, **v)
        for cfg in configs[:2]:
            pre = Preprocess(cfg)
            np.testing.assert_array_equal(pre(stored, meta), _reference_preprocess(stored, meta, cfg), err_msg=str(v))
            assert pre.geometry(stored, meta).box == _reference_box(stored, meta, cfg)
            boxes.append(pre.geometry(stored, meta).box)
    assert (20, 100, 5, 60) in boxes and (0, 120, 0, 90) in boxes  # both a real crop and the whole image
    # 8-bit unsigned pixels
    small = rng.integers(0, 15, size=(50, 40)).astype(np.uint8)  # air: greys below 0.08
    small[10:40, 0:25] = rng.integers(80, 255, size=(30, 25))
    meta = dataclasses.replace(base, rows=50, columns=40, window_centers=(128.0,), window_widths=(256.0,), rescale_slope=1.0,
                               rescale_intercept=0.0)
    np.testing.assert_array_equal(Preprocess(configs[0])(small, meta), _reference_preprocess(small, meta, configs[0]))
    assert Preprocess(configs[0]).geometry(small, meta).box == (10, 40, 0, 25)
