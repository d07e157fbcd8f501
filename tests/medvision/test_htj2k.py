"""HTJ2K (High-Throughput JPEG 2000, ISO/IEC 15444-15; DICOM 1.2.840.10008.1.2.4.201-203) as the reader decodes it.
No Python package installed here encodes HTJ2K and neither corpus holds a file, so the codestreams come from
OpenJPH's own encoder (``ojph_compress``, Debian ``openjph-tools``) and are wrapped in DICOM here: full decoding
(pydicom through pylibjpeg-openjpeg) gives the source pixels back, and a reduced decode (OpenJPEG through Pillow,
the finest levels never decoded) gives the 5/3 low-pass band bit for bit, for the encoder's progressions, code-block
sizes, precincts, tiles, bit depths and level counts; a lossy codestream gives its own 9/7 band, as close as classic
lossy JPEG 2000 is held to. Cut down to the kept resolutions (``j2k_prefix``, HT code-blocks' two segments read as
OpenJPEG reads them), a codestream decodes to the same pixels as whole, mangled or not, with refinement passes
(packet headers rewritten here: OpenJPH writes cleanup passes only) or not; placeholder passes are not cut; a
truncated file is refused by name."""

import copy
import io
import subprocess

import numpy as np
import pytest
from helpers import decode_reduced as decode
from helpers import mangled_cuts, require_tool
from pydicom.uid import HTJ2K, UID, HTJ2KLossless, HTJ2KLosslessRPCL

from medvision.dicom_io import read_dicom
from medvision.errors import CorruptDicomError
from medvision.j2k_prefix import _Bits, _Coding, _passes, _TagTree, coarse_codestream
from medvision.preprocess import Preprocess, PreprocessConfig
from medvision.resolution import J2K_SYNTAXES, j2k_levels, lowpass, reduced_size
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import encapsulated, htj2k_codestream, save
from medvision.synth.vendors import VENDORS


@pytest.fixture(scope="module")
def view():
    """A 12-bit synthetic mammogram of the generator, 512 x 416."""
    return example_image(VENDORS[0], 512, 416, seed=3)


def ojph(pixels: np.ndarray, bits: int, *args: str) -> bytes:
    """``pixels`` (unsigned, ``bits`` deep) encoded by OpenJPH."""
    require_tool("ojph_compress")
    return htj2k_codestream(pixels, bits, *args)


def dicom(ds, codestream: bytes, syntax: UID, **attrs) -> bytes:
    """``ds`` with ``codestream`` as its one encapsulated frame, in ``syntax``."""
    ds = encapsulated(copy.deepcopy(ds), codestream, syntax)
    for key, value in attrs.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()



def assert_cut_decodes_as_whole(codestream: bytes, levels: int) -> None:
    for level in range(1, levels + 1):
        cut = coarse_codestream(codestream, level)
        assert cut is not None and len(cut) < len(codestream), f"level {level} not cut"
        np.testing.assert_array_equal(decode(cut, level), decode(codestream, level), err_msg=f"level {level}")


LOSSLESS = {  # ojph_compress options -> the transfer syntax they are stored in, and whether the cut reads them
    "RPCL (its default)": ([], HTJ2KLosslessRPCL, True),
    "LRCP": (["-prog_order", "LRCP"], HTJ2KLossless, True),
    "RLCP": (["-prog_order", "RLCP"], HTJ2KLossless, True),
    "PCRL": (["-prog_order", "PCRL"], HTJ2KLossless, False),  # resolutions interleaved: decoded whole
    "32x32 code-blocks": (["-block_size", "{32,32}"], HTJ2KLossless, True),
    "precincts": (["-precincts", "{64,64},{128,128}"], HTJ2KLossless, False),
    "7 levels": (["-num_decomps", "7"], HTJ2KLossless, True),
}


@pytest.mark.parametrize("options", LOSSLESS.values(), ids=LOSSLESS.keys())
def test_lossless_htj2k_decodes_to_the_source_and_to_its_low_pass_bands(view, options):
    args, syntax, cut = options
    source = view.pixel_array
    codestream = ojph(source, view.BitsStored, "-reversible", "true", *args)
    assert syntax in J2K_SYNTAXES
    if cut:
        assert_cut_decodes_as_whole(codestream, 5)
    else:
        assert coarse_codestream(codestream, 2) is None
    data = dicom(view, codestream, syntax)
    full, meta = read_dicom(data)
    assert meta.decode == "full" and full.dtype == np.uint16
    np.testing.assert_array_equal(full, source)
    for factor in (2, 4, 8):
        reduced, rmeta = read_dicom(data, long_side=-(-512 // factor))
        assert rmeta.decode == f"1/{factor} wavelet" and reduced.shape == reduced_size(512, 416, factor)
        np.testing.assert_array_equal(reduced, lowpass(source, factor.bit_length() - 1, view.BitsStored, False),
                                      err_msg=f"1/{factor}")


def _tile_distance(index: np.ndarray, size: int, tile: int) -> np.ndarray:
    """How far (in pixels, a half for the two next to it) each index lies from the nearest tile border inside 0..size."""
    borders = np.arange(tile, size, tile)
    return np.min(np.abs(index[:, None] - borders[None, :] + 0.5), axis=1)


@pytest.mark.parametrize("encoder", ["OpenJPH (HTJ2K)", "OpenJPEG (JPEG 2000)"])
def test_a_tiled_codestream_gives_each_tiles_band_exact_away_from_the_tile_borders(view, tmp_path, encoder):
    """Each tile has its own wavelet transform (symmetric extension at its borders), so a tiled codestream's reduced
    image is the band of each tile: the whole image's band, bit for bit, except within a pixel or two of a border."""
    from pydicom.uid import JPEG2000Lossless

    source = view.pixel_array
    if encoder.startswith("OpenJPH"):
        data = dicom(view, ojph(source, view.BitsStored, "-reversible", "true", "-tile_size", "{256,256}"),
                     HTJ2KLossless)
    else:  # (Pillow's tiled encoder does not give 16-bit samples back losslessly)
        raw, out = tmp_path / "in.raw", tmp_path / "out.j2k"
        raw.write_bytes(source.astype(">u2").tobytes())
        subprocess.run([require_tool("opj_compress"), "-i", str(raw), "-o", str(out), "-F",
                        f"416,512,1,{view.BitsStored},u@1x1", "-t", "256,256"], check=True, capture_output=True,
                       timeout=60)
        data = dicom(view, out.read_bytes(), JPEG2000Lossless)
    bits = view.BitsStored
    np.testing.assert_array_equal(read_dicom(data)[0], source)
    span = float(source.max()) - float(source.min())
    for factor in (2, 4, 8):
        reduced, meta = read_dicom(data, long_side=-(-512 // factor))
        assert meta.decode == f"1/{factor} wavelet"
        expected = lowpass(source, factor.bit_length() - 1, bits, False)
        differ = np.argwhere(reduced != expected)
        assert len(differ), "tiles that change nothing: this test no longer shows what it says"
        tile = 256 // factor
        near = np.minimum(_tile_distance(differ[:, 0], reduced.shape[0], tile),
                          _tile_distance(differ[:, 1], reduced.shape[1], tile))
        assert near.max() <= 2.5, factor  # measured 0.5 (1/2) and 1.5 (1/4, 1/8)
        assert np.abs(reduced.astype(np.float64) - expected).mean() <= 0.001 * span  # measured 0.05 % at 1/8


def test_sixteen_bit_htj2k_is_exact_at_every_level(view):
    source = view.pixel_array.astype(np.uint16) * 16 + 15  # the whole 16-bit range
    codestream = ojph(source, 16, "-reversible", "true")
    data = dicom(view, codestream, HTJ2KLosslessRPCL, BitsStored=16, HighBit=15)
    np.testing.assert_array_equal(read_dicom(data)[0], source)
    for factor in (2, 4, 8, 16):
        reduced, meta = read_dicom(data, long_side=-(-512 // factor))
        assert meta.decode == f"1/{factor} wavelet"
        np.testing.assert_array_equal(reduced, lowpass(source, factor.bit_length() - 1, 16, False))


def test_a_codestream_with_fewer_levels_than_asked_is_decoded_at_its_coarsest_then_computed(view):
    source, bits = view.pixel_array, view.BitsStored
    codestream = ojph(source, bits, "-reversible", "true", "-num_decomps", "1")
    assert j2k_levels(codestream)[0] == 1
    reduced, meta = read_dicom(dicom(view, codestream, HTJ2KLosslessRPCL), long_side=128)
    assert meta.decode == "1/4 wavelet (the codestream has 1 levels: the last 1 computed)"
    decoded = lowpass(source, 1, bits, False)  # what the decoder gives at its one level (the band, clamped)
    np.testing.assert_array_equal(reduced, lowpass(decoded, 1, bits, False))
    # the decoder clamps its coarsest band to the stored range (here the skin line overshoots 4095), which two levels
    # computed in one go do not: those few pixels differ, by a few per cent of their value
    assert decoded.max() == (1 << bits) - 1
    differ = reduced != lowpass(source, 2, bits, False)
    assert 0 < differ.mean() < 0.001


def test_lossy_htj2k_gives_its_own_low_pass_band_as_close_as_classic_lossy_jpeg_2000():
    view = example_image(VENDORS[0], 1024, 832, seed=3)
    source = view.pixel_array
    data = dicom(view, ojph(source, view.BitsStored, "-qstep", "0.002"), HTJ2K)
    full, _ = read_dicom(data)
    assert np.abs(full.astype(np.int32) - source).max() <= 32  # lossy: close to the source, not equal
    span = float(full.max()) - float(full.min())
    for factor in (2, 4, 8):
        reduced, meta = read_dicom(data, long_side=1024 // factor)
        assert meta.decode == f"1/{factor} wavelet"
        expected = lowpass(full, factor.bit_length() - 1, view.BitsStored, False)
        # the 9/7 band is not the 5/3 one: they part at sharp edges (the skin line), by 0.25-0.45 % of the range on
        # average here; classic lossy JPEG 2000 is held to 1 % (test_resolution)
        assert np.abs(reduced.astype(np.float64) - expected).mean() <= 0.01 * span, factor
    # what the model sees: within the bounds the lossless syntaxes meet (test_resolution's MEAN / P99 bounds)
    full_pre = Preprocess(PreprocessConfig(image_size=128))
    reduced_pre = Preprocess(PreprocessConfig(image_size=128, decode_long_side=192))
    d = np.abs(full_pre.from_dicom(data)[0] - reduced_pre.from_dicom(data)[0])
    assert d.mean() <= 0.015 and np.percentile(d, 99) <= 0.08, (d.mean(), np.percentile(d, 99))


def test_a_full_field_htj2k_view_is_decoded_at_a_sixteenth_exactly():
    view = example_image(VENDORS[2], 3328, 2560, seed=7)
    source = view.pixel_array
    codestream = ojph(source, view.BitsStored, "-reversible", "true")
    cut = coarse_codestream(codestream, 4)
    assert len(codestream) > 1 << 20 and cut is not None and len(cut) < len(codestream) // 100  # what the reader reads
    reduced, meta = read_dicom(dicom(view, codestream, HTJ2KLosslessRPCL), long_side=208)
    assert meta.decode == "1/16 wavelet" and reduced.shape == (208, 160)
    np.testing.assert_array_equal(reduced, lowpass(source, 4, view.BitsStored, False))


def test_a_truncated_htj2k_codestream_is_refused_by_name(view):
    codestream = ojph(view.pixel_array, view.BitsStored, "-reversible", "true")
    cut = dicom(view, codestream[: len(codestream) // 3], HTJ2KLosslessRPCL)
    for long_side in (0, 128):
        with pytest.raises(CorruptDicomError, match="could not be decoded"):
            read_dicom(cut, long_side=long_side)


def test_lossy_htj2k_is_cut_as_it_decodes_whole(view):
    assert_cut_decodes_as_whole(ojph(view.pixel_array, view.BitsStored, "-qstep", "0.002"), 5)


def test_mangled_htj2k_codestreams_give_none_or_a_cut_that_decodes_as_the_whole_does(view):
    """Bytes changed in the headers or the kept packets (pass counts, lengths, the CAP and COD segments among them):
    where the whole codestream decodes, the cut one decodes to the same pixels."""
    outcomes = mangled_cuts(ojph(view.pixel_array, view.BitsStored, "-reversible", "true"), seed=1)
    assert outcomes["same"] >= 50 and outcomes["none"] >= 20, outcomes


def test_ht_code_blocks_are_cut_only_where_every_one_is_ht_in_one_layer(view):
    codestream = ojph(view.pixel_array, view.BitsStored, "-reversible", "true")
    cap = codestream.index(b"\xff\x50")
    cod = codestream.index(b"\xff\x52")
    assert coarse_codestream(codestream, 2) is not None
    mixed = bytearray(codestream)
    mixed[cap + 8] |= 0xC0  # Ccap15: HT and classic code-blocks mixed
    assert coarse_codestream(bytes(mixed), 2) is None
    other_part = bytearray(codestream)
    other_part[cap + 4] |= 0x40  # Pcap: another part's capabilities too
    assert coarse_codestream(bytes(other_part), 2) is None
    no_cap = codestream[:cap] + codestream[cap + 10:]
    assert coarse_codestream(no_cap, 2) is None  # HT code-blocks without CAP: not read
    styled = bytearray(codestream)
    styled[cod + 12] |= 0x04  # HT with another code-block style bit
    assert coarse_codestream(bytes(styled), 2) is None


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2KLosslessRPCL], ids=["LRCP", "RPCL"])
def test_the_generator_writes_htj2k_losslessly(view, tmp_path, syntax):
    require_tool("ojph_compress")
    path = tmp_path / "view.dcm"
    save(copy.deepcopy(view), path, syntax)
    full, meta = read_dicom(path)
    assert meta.transfer_syntax == syntax
    np.testing.assert_array_equal(full, view.pixel_array)


# -- HT code-blocks with refinement passes (OpenJPH writes cleanup passes only): packet headers rewritten here ------


class _Recorded(_Bits):
    """The packet-header reader, keeping every bit it reads (to write the header back changed)."""

    def __init__(self, data, pos: int) -> None:
        super().__init__(data, pos)
        self.read: list[int] = []

    def bit(self) -> int:
        b = super().bit()
        self.read.append(b)
        return b


def _packets(codestream: bytes):
    """Main header, tile-part header, body and, per resolution (one layer, one precinct), its packet: where its
    header and data lie, its header bits and, per included code-block, where its pass count and lengths lie."""
    sot, sod = codestream.index(b"\xff\x90"), codestream.index(b"\xff\x93")
    main, tile_part, body = codestream[:sot], codestream[sot:sod + 2], codestream[sod + 2:-2]

    def segment(marker: bytes) -> bytes:
        at = main.index(marker)
        return main[at:at + 2 + int.from_bytes(main[at + 2:at + 4], "big")]

    coding = _Coding(segment(b"\xff\x51"), segment(b"\xff\x52"), segment(b"\xff\x50"))
    packets, pos = [], 0
    for r in range(coding.levels + 1):
        bits, blocks = _Recorded(body, pos), []
        if bits.bit():
            for w, h in coding.bands(r):
                inclusion, zeros = _TagTree(w, h), _TagTree(w, h)
                for y in range(h):
                    for x in range(w):
                        if not inclusion.decode(bits, x, y, 1):
                            continue
                        threshold = 1
                        while not zeros.decode(bits, x, y, threshold):
                            threshold += 1
                        at_passes = len(bits.read)
                        assert _passes(bits) == 1  # OpenJPH: the cleanup pass alone
                        at_lblock, lblock = len(bits.read), 3
                        while bits.bit():
                            lblock += 1
                        at_length = len(bits.read)
                        blocks.append({"passes": (at_passes, at_lblock), "length": (at_length, at_length + lblock),
                                       "lblock": lblock, "bytes": bits.bits(lblock)})
        end = bits.align()
        packets.append({"start": pos, "data": end, "bits": bits.read, "blocks": blocks,
                        "end": end + sum(b["bytes"] for b in blocks)})
        pos = packets[-1]["end"]
    assert pos == len(body)
    return main, tile_part, body, packets


def _stuffed(bits: list[int]) -> bytes:
    """Header bits as bytes: seven after a 0xFF byte, padded with zeros, and a zero byte after a final 0xFF."""
    out, i = bytearray(), 0
    while i < len(bits):
        n = 7 if out and out[-1] == 0xFF else 8
        chunk = bits[i:i + n] + [0] * (n - len(bits[i:i + n]))
        out.append(int("".join(map(str, chunk)), 2))
        i += n
    return bytes(out) + (b"\x00" if out and out[-1] == 0xFF else b"")


PASS_CODEWORDS = {2: [1, 0], 3: [1, 1, 0, 0], 4: [1, 1, 0, 1]}


def with_refinement(codestream: bytes, resolution: int, block: int, passes: int, extra: bytes) -> bytes:
    """``codestream`` with code-block ``block`` of resolution ``resolution`` signalling ``passes`` coding passes: its
    cleanup segment as it was, then a refinement segment of ``extra`` bytes (lengths as OpenJPEG reads them)."""
    main, tile_part, body, packets = _packets(codestream)
    packet = packets[resolution]
    b = packet["blocks"][block]
    width = b["lblock"] + (passes - 1).bit_length() - 1
    assert len(extra) < 1 << width
    bits = packet["bits"]
    new = (bits[:b["passes"][0]] + PASS_CODEWORDS[passes] + bits[b["passes"][1]:b["length"][1]]
           + [int(c) for c in format(len(extra), f"0{width}b")] + bits[b["length"][1]:])
    after = packet["data"] + sum(x["bytes"] for x in packet["blocks"][:block + 1])  # the end of its cleanup segment
    data = _stuffed(new) + body[packet["data"]:after] + extra + body[after:packet["end"]]
    body = body[:packet["start"]] + data + body[packet["end"]:]
    tile_part = tile_part[:6] + (len(tile_part) + len(body)).to_bytes(4, "big") + tile_part[10:]
    return main + tile_part + body + b"\xff\xd9"


@pytest.mark.parametrize("passes", [2, 3])
def test_ht_refinement_passes_are_cut_as_the_decoder_reads_them(passes):
    view = example_image(VENDORS[0], 256, 256, seed=2)
    codestream = ojph(view.pixel_array, view.BitsStored, "-reversible", "true")
    rng = np.random.default_rng(passes)
    for resolution, block in ((1, 0), (2, 1), (3, 2)):
        changed = with_refinement(codestream, resolution, block, passes, rng.integers(0, 256, 20, np.uint8).tobytes())
        for level in range(1, 6 - resolution):  # levels that keep the changed packet
            cut = coarse_codestream(changed, level)
            assert cut is not None, (resolution, level)
            # the packets after the changed one still parse where the decoder reads them: the same pixels
            np.testing.assert_array_equal(decode(cut, level), decode(changed, level), err_msg=f"r{resolution} l{level}")


def test_ht_placeholder_passes_are_not_cut():
    view = example_image(VENDORS[0], 256, 256, seed=2)
    codestream = ojph(view.pixel_array, view.BitsStored, "-reversible", "true")
    changed = with_refinement(codestream, 2, 0, 4, b"")
    assert coarse_codestream(changed, 1) is None
    assert coarse_codestream(with_refinement(codestream, 2, 0, 3, b""), 1) is not None
