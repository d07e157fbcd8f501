"""Reader conformance over real files nobody here wrote: pydicom-data plus pydicom's bundled test files.

``dicom_conformance.csv`` writes down, one row per file, what ``read_dicom`` must do: decode
("ok") or raise the documented error code. Added files in either corpus fail the coverage test until
they get a row. On top of the table: lossless files equal their uncompressed twins, MONOCHROME1
files come out inverted, and Modality / VOI LUT sequences give the reference implementation's values.
"""

import csv
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medvision.dicom_io import read_dicom, transfer_syntax_hint
from medvision.errors import MedvisionError
from medvision.preprocess import PreprocessConfig, apply_lut_table, to_display

data_store = pytest.importorskip("data_store", reason="pydicom-data is in the 'dev' extra")

ROOTS = {
    "pydicom-data": Path(data_store.__file__).parent / "data",
    "pydicom": Path(pydicom.__file__).parent / "data" / "test_files",
}
SKIP_SUFFIXES = (".py", ".pyc", ".txt", ".json", ".dump", ".icc", ".gz")
TABLE = Path(__file__).with_name("dicom_conformance.csv")
with TABLE.open(newline="") as _fh:
    ROWS = list(csv.DictReader(_fh))


def corpus_files() -> set[tuple[str, str]]:
    found = set()
    for corpus, root in ROOTS.items():
        for path in root.rglob("*"):
            if path.is_file() and not path.name.endswith(SKIP_SUFFIXES) and "__pycache__" not in path.parts:
                found.add((corpus, path.relative_to(root).as_posix()))
    return found


def path_of(corpus: str, name: str) -> Path:
    return ROOTS[corpus] / name


def test_the_table_covers_every_file_of_both_corpora():
    listed = {(r["corpus"], r["file"]) for r in ROWS}
    assert listed == corpus_files()
    assert sum(r["expect"] == "ok" for r in ROWS) >= 60


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("row", ROWS, ids=[f"{r['corpus']}/{r['file']}" for r in ROWS])
def test_file_decodes_or_raises_its_documented_error(row):
    path = path_of(row["corpus"], row["file"])
    if row["expect"] == "ok":
        pixels, meta = read_dicom(path)
        assert pixels.shape == (meta.rows, meta.columns)
        grey = to_display(pixels, meta, PreprocessConfig())
        assert grey.dtype == np.float32 and np.isfinite(grey).all()
        assert 0.0 <= grey.min() and grey.max() <= 1.0
    else:
        with pytest.raises(MedvisionError) as info:
            read_dicom(path)
        assert info.value.code == row["expect"], info.value.message


TWINS = [  # (uncompressed, compressed) pairs of one image
    ("pydicom-data", "693_UNCR.dcm", "693_J2KR.dcm"),
    ("pydicom-data", "MR2_UNCR.dcm", "MR2_J2KR.dcm"),
    ("pydicom-data", "RG1_UNCR.dcm", "RG1_J2KR.dcm"),
    ("pydicom-data", "RG3_UNCR.dcm", "RG3_J2KR.dcm"),
    ("pydicom", "MR_small.dcm", "MR_small_RLE.dcm"),
    ("pydicom", "MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("pydicom", "MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("pydicom", "MR_small.dcm", "MR_small_bigendian.dcm"),
    ("pydicom", "MR_small.dcm", "MR_small_expb.dcm"),
    ("pydicom", "MR_small.dcm", "MR_small_implicit.dcm"),
]


@pytest.mark.parametrize("corpus,raw,compressed", TWINS, ids=[t[2] for t in TWINS])
def test_lossless_file_equals_its_uncompressed_twin(corpus, raw, compressed):
    a, meta_a = read_dicom(path_of(corpus, raw))
    b, meta_b = read_dicom(path_of(corpus, compressed))
    assert meta_a.transfer_syntax != meta_b.transfer_syntax
    np.testing.assert_array_equal(a.astype(np.int64), b.astype(np.int64))


MONOCHROME1 = [r for r in ROWS if r["expect"] == "ok" and r["note"].startswith("MONOCHROME1")]


@pytest.mark.parametrize("row", MONOCHROME1, ids=[r["file"] for r in MONOCHROME1])
def test_monochrome1_comes_out_inverted(row):
    pixels, meta = read_dicom(path_of(row["corpus"], row["file"]))
    grey = to_display(pixels, meta, PreprocessConfig(voi="percentile"))
    sample = np.random.default_rng(0).choice(pixels.size, size=min(pixels.size, 20000), replace=False)
    stored, shown = pixels.ravel()[sample].astype(float), grey.ravel()[sample].astype(float)
    assert np.corrcoef(stored, shown)[0, 1] < -0.9  # high stored values display dark


def test_monochrome1_corpus_is_not_empty():
    assert len(MONOCHROME1) >= 4


def test_modality_lut_sequence_matches_pydicom():
    path = path_of("pydicom-data", "mlut_18.dcm")
    pixels, meta = read_dicom(path)
    assert meta.modality_lut is not None
    ds = pydicom.dcmread(path)
    ours = apply_lut_table(pixels, meta.modality_lut.first_mapped, meta.modality_lut.table)
    np.testing.assert_array_equal(ours, apply_modality_lut(ds.pixel_array, ds))


def test_voi_lut_sequence_matches_pydicom():
    path = path_of("pydicom-data", "vlut_04.dcm")
    pixels, meta = read_dicom(path)
    assert meta.voi_lut is not None and not meta.window_centers
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = apply_voi_lut(ds.pixel_array, ds, prefer_lut=True) / ((1 << meta.voi_lut.bits) - 1)
    np.testing.assert_allclose(to_display(pixels, meta, PreprocessConfig()), ref, atol=1e-6)


def test_signed_pixels_keep_their_sign():
    pixels, meta = read_dicom(path_of("pydicom", "MR_small.dcm"))
    assert meta.signed and pixels.dtype.kind == "i"
    pixels, meta = read_dicom(path_of("pydicom", "CT_small.dcm"))
    assert pixels.dtype.kind == ("i" if meta.signed else "u")


def test_paths_in_the_table_exist():
    missing = [r["file"] for r in ROWS if not os.path.exists(path_of(r["corpus"], r["file"]))]
    assert not missing


def test_the_transfer_syntax_hint_is_pydicoms_on_every_file_of_both_corpora():
    """``transfer_syntax_hint`` (the file meta read without parsing the dataset: where the service decodes a file)
    names what pydicom reads in the file meta, or None where the file has no DICM marker, on every corpus file."""
    checked = with_marker = 0
    for corpus, name in sorted(corpus_files()):
        data = path_of(corpus, name).read_bytes()
        hint = transfer_syntax_hint(data)
        checked += 1
        if data[128:132] != b"DICM":
            assert hint is None, name
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
            except Exception:  # a file pydicom cannot read: the hint only must not fail
                continue
        expected = meta.get("TransferSyntaxUID")
        if expected is not None:
            assert hint == str(expected), name
            with_marker += 1
    assert checked == len(ROWS) and with_marker > 100
    for cut in (0, 100, 131, 132, 140, 200):  # cut short anywhere: None or the syntax, never an error
        assert transfer_syntax_hint(path_of("pydicom", "CT_small.dcm").read_bytes()[:cut]) in (
            None, "1.2.840.10008.1.2.1")
