"""Cutting a JPEG 2000 codestream down to the resolutions a reduced decode keeps. The one thing that matters: the cut
codestream decodes to the same pixels as the whole one at every level, bit for bit, for every encoder option that
is read (Pillow's OpenJPEG and OpenJPEG's own ``opj_compress``: progressions, layers, code-block sizes and styles,
SOP / EPH markers, tile-parts split by resolution, PLT / TLM), every vendor of the synthetic generator and every
JPEG 2000 file of the real corpus; and whatever is not read (tiles, precincts, interleaved progressions, truncated or
malformed codestreams) gives None, never an exception, so the decoder gets the whole codestream as before."""

import copy
import csv
import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import decode_reduced as decode
from helpers import mangled_cuts, require_tool
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000Lossless

from medvision import resolution
from medvision.dicom_io import read_dicom
from medvision.j2k_prefix import MAX_CODE_BLOCKS, NeedMore, coarse_codestream
from medvision.resolution import J2K_SYNTAXES, j2k_levels, lowpass
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import save
from medvision.synth.vendors import VENDORS


def assert_same_at_every_level(codestream, top: int | None = None) -> list[float]:
    """The cut codestream's pixels at each level against the whole one's; the kept fraction of the bytes."""
    levels = j2k_levels(codestream)[0] if top is None else top
    kept = []
    for level in range(1, levels + 1):
        cut = coarse_codestream(codestream, level)
        assert cut is not None, f"level {level} not cut"
        try:
            whole = decode(codestream, level)
        except OSError:  # OpenJPEG gives no image this small from the whole codestream either (a 4 x 4 band)
            assert level >= 6
            continue
        np.testing.assert_array_equal(decode(cut, level), whole, err_msg=f"level {level}")
        kept.append(len(cut) / len(codestream))
    assert len(kept) >= min(levels, 5)
    return kept


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 12-bit synthetic mammogram, 512 x 416."""
    return example_image(VENDORS[0], 512, 416, seed=3).pixel_array.astype(np.uint16)


def pillow(image, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG2000", no_jp2=True, **options)
    return buf.getvalue()


READ = {
    "default (LRCP, one layer)": {},
    "RLCP": {"progression": "RLCP"},
    "RPCL": {"progression": "RPCL"},
    "3 resolutions": {"num_resolutions": 3},
    "8 resolutions": {"num_resolutions": 8},
    "32 x 32 code-blocks": {"codeblock_size": (32, 32)},
    "16 x 128 code-blocks": {"codeblock_size": (16, 128)},
    "PLT markers": {"plt": True},
    "lossy 9/7": {"irreversible": True},
    "lossy, 3 layers, RLCP": {"irreversible": True, "quality_layers": [40, 20, 10], "progression": "RLCP"},
    "lossless, 3 layers, RPCL": {"quality_layers": [40, 20, 0], "progression": "RPCL"},
}


@pytest.mark.parametrize("options", READ.values(), ids=READ.keys())
def test_pillow_codestreams_decode_the_same_cut(image, options):
    kept = assert_same_at_every_level(pillow(image, **options))
    if options.get("num_resolutions", 6) > 3:
        assert kept[1] < 0.4  # at 1/4 most of the bytes are left out


NOT_READ = {
    "PCRL": {"progression": "PCRL"},
    "CPRL": {"progression": "CPRL"},
    "LRCP, 3 layers": {"quality_layers": [40, 20, 0]},
    "tiles": {"tile_size": (256, 256)},
    "precincts": {"precinct_size": (64, 64)},
}


@pytest.mark.parametrize("options", NOT_READ.values(), ids=NOT_READ.keys())
def test_what_is_not_read_gives_none(image, options):
    codestream = pillow(image, **options)
    assert [coarse_codestream(codestream, level) for level in (1, 2, 3)] == [None] * 3
    # and the reduced decoder still decodes it, whole
    np.testing.assert_array_equal(resolution.decode_j2k_reduced(codestream, 2, np.uint16), decode(codestream, 2))


OPJ = {
    "SOP and EPH markers": ["-SOP", "-EPH"],
    "SOP markers alone": ["-SOP"],
    "EPH markers alone": ["-EPH"],
    "SOP, EPH, 3 layers, RLCP": ["-SOP", "-EPH", "-r", "20,5,1", "-p", "RLCP"],
    "tile-parts by resolution": ["-TP", "R"],
    "tile-parts by resolution, TLM, PLT": ["-TP", "R", "-TLM", "-PLT"],
    "reset, vertical causal, segmentation symbols": ["-M", "42"],
    "7 resolutions, 32 x 64 code-blocks": ["-n", "7", "-b", "32,64"],
}
OPJ_NOT_READ = {
    "arithmetic coding bypass": ["-M", "1"],
    "termination on each pass": ["-M", "4"],
    "tile-parts by layer": ["-TP", "L", "-r", "20,5,1"],
    "image offset": ["-d", "37,11"],
}


def opj(image, tmp_path, args) -> bytes:
    """``image`` encoded by OpenJPEG's own encoder (Debian libopenjp2-tools), which writes what Pillow cannot."""
    tool = require_tool("opj_compress")
    raw = tmp_path / "in.raw"
    raw.write_bytes(image.astype(">u2").tobytes())
    out = tmp_path / "out.j2k"
    subprocess.run([tool, "-i", str(raw), "-o", str(out), "-F",
                    f"{image.shape[1]},{image.shape[0]},1,12,u@1x1", *args],
                   check=True, capture_output=True, timeout=60)
    return out.read_bytes()


@pytest.mark.parametrize("args", OPJ.values(), ids=OPJ.keys())
def test_opj_compress_codestreams_decode_the_same_cut(image, tmp_path, args):
    codestream = opj(image, tmp_path, args)
    assert_same_at_every_level(codestream)


@pytest.mark.parametrize("args", OPJ_NOT_READ.values(), ids=OPJ_NOT_READ.keys())
def test_opj_compress_codestreams_not_read_give_none(image, tmp_path, args):
    codestream = opj(image, tmp_path, args)
    assert coarse_codestream(codestream, 2) is None


def cut_as_it_arrives(codestream, levels: int, step: int) -> tuple[list[int], bytes | None]:
    """``coarse_codestream`` of ever longer starts of ``codestream`` (``size=`` its length), until it answers: the
    lengths it asked for more at, and its answer."""
    asked = []
    for n in range(step, len(codestream) + step, step):
        try:
            return asked, coarse_codestream(memoryview(codestream)[:n], levels, size=len(codestream))
        except NeedMore:
            asked.append(n)
    raise AssertionError("still asking for more with the whole codestream")


ARRIVING = {**{f"pillow {k}": ("pillow", v) for k, v in READ.items()},
            **{f"opj_compress {k}": ("opj", v) for k, v in {**OPJ, **OPJ_NOT_READ}.items()},
            **{f"pillow {k}": ("pillow", v) for k, v in NOT_READ.items()}}


@pytest.mark.parametrize("source", ARRIVING.values(), ids=ARRIVING.keys())
def test_a_codestream_cut_as_it_arrives_is_cut_as_the_whole_one_or_not_at_all(image, tmp_path, source):
    """Cut from its first bytes only (a body still arriving, ``size=``), a codestream gives the cut of the whole
    codestream or None, never another cut, whatever its layout (read or not, tile-parts by resolution included);
    it asks for more only while the kept packets have not all arrived, and where the whole is one tile-part it cuts
    as soon as they have."""
    kind, options = source
    codestream = pillow(image, **options) if kind == "pillow" else opj(image, tmp_path, options)
    for levels in (2, 3):
        whole = coarse_codestream(codestream, levels)
        asked, cut = cut_as_it_arrives(codestream, levels, step=max(64, len(codestream) // 64))
        assert cut is None or cut == whole
        if whole is not None and codestream.count(b"\xff\x90\x00\x0a") == 1:  # one tile-part: cut from its start
            assert cut == whole and (not asked or asked[-1] < len(whole) + 64 + len(codestream) // 64)
            assert len(asked) < 64  # (not only once every byte is in)


def test_every_generator_vendor_decodes_the_same_cut(tmp_path):
    for vendor in VENDORS:
        path = tmp_path / f"{vendor.machine_id}.dcm"
        save(copy.deepcopy(example_image(vendor, 1024, 832, seed=1)), path, JPEG2000Lossless)
        codestream = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
        assert_same_at_every_level(codestream)


data_store = pytest.importorskip("data_store", reason="pydicom-data is in the 'dev' extra")
ROOTS = {"pydicom-data": Path(data_store.__file__).parent / "data",
         "pydicom": Path(pydicom.__file__).parent / "data" / "test_files"}
with Path(__file__).with_name("dicom_conformance.csv").open(newline="") as _fh:
    CORPUS = [r for r in csv.DictReader(_fh) if r["expect"] == "ok"]


def _j2k_codestream(row):
    ds = pydicom.dcmread(ROOTS[row["corpus"]] / row["file"], force=True)
    if str(ds.get("file_meta", {}).get("TransferSyntaxUID", "")) not in J2K_SYNTAXES:
        return None
    return next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_corpus_jpeg_2000_file_decodes_the_same_cut_or_is_left_whole():
    cut = left = 0
    for row in CORPUS:
        codestream = _j2k_codestream(row)
        if codestream is None or j2k_levels(codestream) is None:
            continue
        for level in range(1, j2k_levels(codestream)[0] + 1):
            try:
                whole = decode(codestream, level)
            except OSError:  # OpenJPEG refuses this level of the whole codestream too
                continue
            coarse = coarse_codestream(codestream, level)
            if coarse is None:
                left += 1
                continue
            np.testing.assert_array_equal(decode(coarse, level), whole, err_msg=f"{row['file']} level {level}")
            cut += 1
    assert cut >= 40 and left >= 5, (cut, left)  # 11 files cut at their levels; tiled / 3-layer LRCP left whole


def test_the_reader_decodes_a_full_field_size_codestream_from_its_cut(tmp_path, monkeypatch):
    path = tmp_path / "ff.dcm"
    save(example_image(VENDORS[1], 2048, 1664, seed=2), path, JPEG2000Lossless)
    calls = []
    real = resolution.coarse_codestream

    def spy(codestream, levels):
        out = real(codestream, levels)
        calls.append((levels, out is not None and len(out) < len(codestream) // 20))
        return out

    monkeypatch.setattr(resolution, "coarse_codestream", spy)
    full, meta = read_dicom(path)
    reduced, rmeta = read_dicom(path, long_side=128)
    assert calls == [(4, True)] and rmeta.decode == "1/16 wavelet"
    np.testing.assert_array_equal(reduced, lowpass(full, 4, meta.bits_stored, meta.signed))


# -- what is not read, and bad input: None, at once, never an exception --------------------------------------------


def test_a_tile_part_running_to_the_end_of_the_codestream_is_read(image):
    codestream = bytearray(pillow(image))
    sot = codestream.index(b"\xff\x90\x00\x0a")
    codestream[sot + 6:sot + 10] = bytes(4)  # Psot 0: the last tile-part runs to EOC
    assert_same_at_every_level(bytes(codestream))


def test_a_resolution_over_two_default_precincts_is_not_read():
    """A resolution wider than 2^15 samples lies in two precincts, so two packets a layer: not read here."""
    wide = np.tile(np.arange(70000, dtype=np.uint16) % 4096, (4, 1))
    codestream = pillow(wide, num_resolutions=3)
    assert coarse_codestream(codestream, 2) is not None  # resolution 0 (17500 wide) alone
    assert coarse_codestream(codestream, 1) is None  # resolution 1 is 35000 wide


def test_coding_markers_in_a_later_tile_part_are_not_read(image, tmp_path):
    codestream = opj(image, tmp_path, ["-TP", "R"])
    assert coarse_codestream(codestream, 2) is not None
    second = codestream.index(b"\xff\x90\x00\x0a", codestream.index(b"\xff\x90\x00\x0a") + 1)
    qcd = codestream[codestream.index(b"\xff\x5c"):]
    qcd = qcd[:2 + int.from_bytes(qcd[2:4], "big")]
    psot = int.from_bytes(codestream[second + 6:second + 10], "big") + len(qcd)
    moved = (codestream[:second + 6] + psot.to_bytes(4, "big") + codestream[second + 10:second + 12] + qcd
             + codestream[second + 12:])
    assert coarse_codestream(moved, 2) is None  # a QCD there would apply to the tile: not dropped, not read


def test_a_truncated_codestream_is_not_cut(image):
    codestream = pillow(image)
    assert coarse_codestream(codestream[: len(codestream) // 2], 2) is None
    assert coarse_codestream(codestream[:-2], 2) is not None  # EOC left out: the lengths still add up
    assert coarse_codestream(codestream + b"\x00", 2) is not None  # a DICOM fragment's padding
    assert coarse_codestream(codestream[:-3], 2) is None
    assert coarse_codestream(codestream, 0) is None
    assert coarse_codestream(codestream, 7) is None  # more levels than the codestream's 5


def test_a_header_asking_for_millions_of_code_blocks_is_not_read(image):
    codestream = bytearray(pillow(image, num_resolutions=2))
    siz = codestream.index(b"\xff\x51")
    for offset in (6, 10, 22, 26):  # Xsiz, Ysiz, XTsiz, YTsiz: 60000 x 60000, one tile
        codestream[siz + offset:siz + offset + 4] = (60000).to_bytes(4, "big")
    assert coarse_codestream(bytes(codestream), 1) is None
    assert (60000 // 2 // 64) ** 2 > MAX_CODE_BLOCKS


def test_mangled_codestreams_give_none_or_a_cut_that_decodes_as_the_whole_does(image):
    """Bytes changed in the headers or the kept packets: whatever the cut codestream is, where the whole one
    decodes, the cut one decodes to the same pixels (the two read the same packet headers the same way)."""
    outcomes = mangled_cuts(pillow(image, progression="RLCP"), seed=0)
    assert outcomes["same"] >= 50 and outcomes["none"] >= 50, outcomes
    assert coarse_codestream(b"\xff\x4f\xff\x51" + bytes(60), 2) is None
    assert coarse_codestream(b"", 2) is None


def test_a_cut_the_decoder_refuses_gives_way_to_the_whole_codestream(tmp_path, monkeypatch):
    """Whatever the cut codestream trips on in OpenJPEG, the whole one decides, so nothing that decoded before is
    refused because of the cut."""
    path = tmp_path / "ff.dcm"
    save(example_image(VENDORS[2], 2048, 1664, seed=4), path, JPEG2000Lossless)
    monkeypatch.setattr(resolution, "coarse_codestream", lambda codestream, levels: b"\xff\x4f\xff\x51 not a codestream")
    full, meta = read_dicom(path)
    reduced, rmeta = read_dicom(path, long_side=128)
    assert rmeta.decode == "1/16 wavelet"  # decoded reduced, from the whole codestream
    np.testing.assert_array_equal(reduced, lowpass(full, 4, meta.bits_stored, meta.signed))
