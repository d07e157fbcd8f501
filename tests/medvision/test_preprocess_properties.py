"""Property-based tests of the preprocessing chain (Hypothesis): whatever combination of pixel type, modality LUT
(rescale or table), VOI (window of any function and width, table, percentiles), photometric interpretation,
presentation LUT, crop and orientation a header asks for, the model input is finite and inside the normalised
display range, or the image is refused with a PreprocessError that names the step. Never anything else."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medvision.dicom_io import DicomMeta, Lut
from medvision.errors import PreprocessError
from medvision.preprocess import Preprocess, PreprocessConfig, to_display

DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32]
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
anything = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def images(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = (draw(st.integers(4, 48)), draw(st.integers(4, 48)))
    if dtype.kind == "f":
        elements = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    stored = draw(arrays(dtype, shape, elements=elements))
    if draw(st.booleans()):  # a breast-like bright region on dark background, so the crop has something to find
        r0, c0 = draw(st.integers(0, shape[0] // 2)), draw(st.integers(0, shape[1] // 2))
        stored[r0:, c0:] = stored.max()
    return stored


@st.composite
def luts(draw, max_len=600):
    bits = draw(st.sampled_from([8, 10, 12, 16]))
    n = draw(st.integers(1, max_len))
    table = np.asarray(draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n)), dtype=np.float64)
    return Lut(draw(st.integers(-70000, 70000)), bits, table)


@st.composite
def metas(draw, stored):
    signed = stored.dtype.kind == "i"
    bits = draw(st.integers(1, 8 * stored.dtype.itemsize))
    return DicomMeta(
        sop_instance_uid=None, study_instance_uid=None, series_instance_uid=None, sop_class="1.2.840.10008.5.1.4.1.1.1.2",
        modality=draw(st.sampled_from(["MG", "CR", "CT", None])), transfer_syntax="1.2.840.10008.1.2.1",
        photometric=draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"])),
        rows=stored.shape[0], columns=stored.shape[1], bits_stored=bits, signed=signed,
        rescale_slope=draw(st.one_of(finite, st.just(1.0), st.just(0.0))),
        rescale_intercept=draw(st.one_of(finite, st.just(0.0))),
        window_centers=tuple(draw(st.lists(st.one_of(finite, anything), max_size=2))),
        window_widths=tuple(draw(st.lists(st.one_of(finite, anything, st.sampled_from([0.0, 0.5, 1.0, -5.0])),
                                          max_size=2))),
        voi_lut_function=draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "", "SOMETHING"])),
        voi_lut=draw(st.one_of(st.none(), luts())),
        modality_lut=draw(st.one_of(st.none(), luts(max_len=300))),
        presentation_lut_shape=draw(st.sampled_from([None, "IDENTITY", "INVERSE", "inverse", ""])),
    )


configs = st.builds(
    PreprocessConfig, image_size=st.sampled_from([16, 24, 33]), voi=st.sampled_from(["dicom", "percentile"]),
    orientation=st.sampled_from(["chest_wall_left", "none"]), crop_to_breast=st.booleans(),
    crop_long_side=st.sampled_from([None, 0, 16]),
    percentiles=st.sampled_from([(0.5, 99.5), (0.0, 100.0), (50.0, 50.0)]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_lut_window_and_photometric_combination_gives_a_finite_input_in_range_or_a_named_refusal(data):
    stored = data.draw(images())
    meta = data.draw(metas(stored))
    cfg = data.draw(configs)
    try:
        x = Preprocess(cfg)(stored, meta)
    except PreprocessError as exc:
        assert "preprocessing step" in str(exc)  # names the step that refused
        return
    assert x.shape == (1, cfg.image_size, cfg.image_size) and x.dtype == np.float32
    assert np.isfinite(x).all()
    lo, hi = (0 - cfg.mean) / cfg.std, (1 - cfg.mean) / cfg.std
    assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_display_greys_stay_in_zero_one_for_valid_windows(data):
    """With a usable window (width >= 1, finite) the display chain never leaves [0, 1], whatever the LUTs."""
    stored = data.draw(images())
    meta = data.draw(metas(stored))
    cfg = PreprocessConfig(image_size=16)
    center, width = data.draw(finite), data.draw(st.floats(1.0, 1e6))
    from dataclasses import replace

    meta = replace(meta, window_centers=(center,), window_widths=(width,))
    grey = to_display(stored, meta, cfg)
    assert np.isfinite(grey).all() and grey.min() >= 0.0 and grey.max() <= 1.0


def test_a_window_a_header_spells_as_nan_or_infinity_is_no_window():
    """Found by the property: a NaN window centre (a DS value may spell it) made every model input NaN."""
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    base = DicomMeta(None, None, None, "1.2", "MG", "1.2.840.10008.1.2.1", "MONOCHROME2", 8, 8, 16, False)
    pre = Preprocess(PreprocessConfig(image_size=16))
    for centre, width in ((float("nan"), 100.0), (float("inf"), 100.0), (40.0, float("inf"))):
        from dataclasses import replace

        x = pre(stored, replace(base, window_centers=(centre,), window_widths=(width,)))
        np.testing.assert_array_equal(x, pre(stored, base))  # the percentile fallback, as without a window


def test_a_modality_lut_starting_below_zero_on_unsigned_pixels_is_applied():
    """Found by the property: a negative first mapped value on unsigned pixels raised OverflowError (NumPy 2)."""
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    meta = DicomMeta(None, None, None, "1.2", "CR", "1.2.840.10008.1.2.1", "MONOCHROME2", 2, 2, 8, False,
                     modality_lut=Lut(-1, 8, np.array([10.0, 20.0, 30.0, 40.0, 50.0])))
    from medvision.preprocess import modality_values

    np.testing.assert_array_equal(modality_values(stored, meta), [[20, 30], [40, 50]])


def test_a_window_of_width_one_is_a_threshold():
    """PS3.3 C.11.2.1.2.1 with w = 1: below or at c - 0.5 black, above white (the formula would divide by zero)."""
    from medvision.preprocess import apply_window

    np.testing.assert_array_equal(apply_window(np.array([9.0, 9.5, 10.0, 11.0]), 10.0, 1.0), [0, 0, 1, 1])
