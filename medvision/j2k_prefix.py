"""A JPEG 2000 codestream cut down to the resolutions a reduced decode keeps, so the decoder never reads the rest.

OpenJPEG asked for a reduced image still reads the whole tile and parses the header of every packet, the finest
levels' included: reading a full-field mammogram at 1/16 took 6.5-7.7 ms with its whole 6-11 MB codestream and
4.6-4.9 ms with only the packets it keeps, a few kilobytes (the rest is the entropy decoding of those). Where the codestream is ordered resolution by resolution (one quality layer in LRCP, or RLCP / RPCL),
the packets of the kept resolutions are a prefix of the tile's data. :func:`coarse_codestream` finds where that
prefix ends by reading the packet headers of the kept resolutions (ISO/IEC 15444-1 B.10: tag trees, pass counts,
lengths), and writes a codestream of its own: the same main header, one tile-part holding that prefix, then an
empty packet for every packet it left out. That is a complete, valid codestream whose coarse resolutions carry the
same bits as the original's, so the reduced decode of either gives the same pixels, bit for bit (tested on every
vendor of the synthetic generator and every JPEG 2000 file of the real corpus).

HTJ2K (ISO/IEC 15444-15) is read where every code-block is high-throughput (CAP declares Part 15 alone, HT only)
in one quality layer, with at most three coding passes a code-block (one HT set: placeholder passes are read one
way by the standard and another by OpenJPEG): its cleanup pass and its refinement passes then come as two codeword
segments, whose lengths are read as OpenJPEG reads them (the decoder the cut is for).

Anything outside the cases read here (several tiles or components, precinct partitions, image offsets, a
resolution wider than one default precinct, packed packet headers, code-block styles with several codeword segments,
progression orders that interleave resolutions, coding markers in later tile-parts, a tile-part or codestream whose
lengths do not add up) gives ``None``, and the caller hands the whole codestream to the decoder as before: a
truncated file is refused by the decoder as it always was. Damage confined to the packets left out is not seen
(those bytes are never read), as a reduced decode cannot need them.
"""

from __future__ import annotations

import struct

# Markers (ISO/IEC 15444-1 A.2)
SOC, SOT, SOD, EOC = 0xFF4F, 0xFF90, 0xFF93, 0xFFD9
SIZ, COD, COC, QCD, QCC, RGN, POC, PPM, PPT, TLM, PLM, PLT, CRG, COM = (
    0xFF51, 0xFF52, 0xFF53, 0xFF5C, 0xFF5D, 0xFF5E, 0xFF5F, 0xFF60, 0xFF61, 0xFF55, 0xFF57, 0xFF58, 0xFF63, 0xFF64)
SOP, EPH = 0xFF91, 0xFF92
CAP = 0xFF50  # ISO/IEC 15444-15 (HTJ2K) declares its high-throughput code-blocks here
_KEPT_MAIN = {SIZ, CAP, COD, QCD, QCC, RGN, CRG}  # TLM / PLM describe the original's tile-parts, COM nothing: dropped
_KEPT_TILE = {QCD, QCC, RGN}  # in the first tile-part only; PLT describes the original's packets, COM nothing
_LRCP, _RLCP, _RPCL = 0, 1, 2
# Bounds on the work one codestream may ask of this pure-Python reader (a hostile header could ask for millions of
# code-blocks): past them the decoder gets the whole codestream, as it would without this module.
MAX_CODE_BLOCKS = 4096  # code-block contributions read (layers x code-blocks of the kept resolutions)
_MAX_SEGMENTS = 512  # marker segments in a header
_MAX_LEVELS = 32  # decomposition levels (the standard's most)
_MAX_LAYERS = 998  # OpenJPEG's tag trees start at 999: more layers than that it reads its own way
_MAX_PASSES = 109  # coding passes of a code-block in one codeword segment (more start a second segment)
_MAX_BITPLANES = 64  # zero bit-planes beyond any precision (38 bits at most)
_MAX_LBLOCK = 40  # bits of a code-block's length
_MAX_LENGTH_BITS = 32  # bits of one codeword segment's length (OpenJPEG reads no wider)
_HT = 0x40  # code-block style: high-throughput (HTJ2K) code-blocks
_PART_15 = 0x00020000  # Pcap: Part 15 capabilities, and no other part's


class _Unsupported(Exception):
    """The codestream is outside what this module reads; the caller decodes it whole."""


class _Short(_Unsupported):
    """A header or a packet runs past the data."""


class NeedMore(Exception):
    """``coarse_codestream(..., size=)``: the kept packets run past the bytes that have arrived."""


def coarse_codestream(codestream, levels: int, size: int | None = None) -> bytes | None:
    """``codestream`` holding only the packets a decode that discards its ``levels`` finest wavelet levels reads,
    or None where that cannot be done here (the caller then decodes the original). ``levels`` 0 gives None.

    ``size``: ``codestream`` is only the first bytes, as they arrive, of a codestream this long. Its first tile-part
    is read as the whole tile (the end of the codestream, which says whether it is, has not arrived): ``NeedMore``
    when the kept packets run past what has; the result is the cut of the whole codestream wherever that holds one
    tile-part, which is for the caller to make sure of (it compares the two cuts)."""
    if levels <= 0:
        return None
    data = memoryview(codestream).cast("B")
    try:
        return _coarse(data, levels) if size is None else _coarse_start(data, levels, size)
    except (_Unsupported, IndexError, struct.error) as exc:
        if size is not None and len(data) < size and isinstance(exc, (_Short, IndexError, struct.error)):
            raise NeedMore from None  # a header or a packet (header) runs past the bytes that have arrived
        return None


def _segments(data, pos: int, end: int):
    """``(marker, start, stop)`` of each marker segment from ``pos`` up to the first SOT or SOD."""
    for _ in range(_MAX_SEGMENTS):
        if pos + 4 > end:
            break
        marker, length = struct.unpack_from(">HH", data, pos)
        if marker in (SOT, SOD):
            return
        if marker >> 8 != 0xFF or length < 2:
            raise _Unsupported("not a marker segment")
        if pos + 2 + length > end:
            raise _Short("header runs past the data")
        yield marker, pos, pos + 2 + length
        pos += 2 + length
    raise (_Unsupported("too many segments in a header") if pos + 4 <= end else _Short("header runs past the data"))


class _Coding:
    """What the packets' layout depends on, from SIZ and COD."""

    def __init__(self, siz, cod, cap=None) -> None:
        (_, x1, y1, x0, y0, tw, th, tx0, ty0, comps) = struct.unpack_from(">HIIIIIIIIH", siz, 4)
        if comps != 1:
            raise _Unsupported("several components")
        if siz[41] != 1 or siz[42] != 1:  # XRsiz, YRsiz
            raise _Unsupported("subsampled component")
        if tx0 + tw < x1 or ty0 + th < y1 or tx0 > x0 or ty0 > y0:
            raise _Unsupported("several tiles")
        if x0 or y0:
            raise _Unsupported("image offset")  # Pillow decodes none of these at a reduced size anyway
        self.x0, self.y0, self.x1, self.y1 = x0, y0, x1, y1
        scod = cod[4]
        self.progression, self.layers = cod[5], struct.unpack_from(">H", cod, 6)[0]
        self.levels, xcb, ycb, self.style = cod[9], cod[10] + 2, cod[11] + 2, cod[12]
        if scod & 0x01:
            raise _Unsupported("precinct partition")  # one precinct per resolution is all that is read here
        if self.levels > _MAX_LEVELS or self.layers > _MAX_LAYERS:
            raise _Unsupported("more levels or layers than read here")
        # HTJ2K: every code-block high-throughput (CAP says Part 15 alone, HT only) and no other style bit, in one
        # layer: each code-block then contributes once, its cleanup pass and its refinement passes in two segments
        pcap, ccap15 = struct.unpack_from(">IH", cap, 4) if cap is not None and len(cap) == 10 else (0, 0)
        # Ccap15: top two bits 0 = HT code-blocks only; 0x2000 = several HT sets in a code-block (placeholder passes)
        self.ht = self.style == _HT and self.layers == 1 and pcap == _PART_15 and ccap15 >> 14 == 0 and \
            not ccap15 & 0x2000
        if cap is not None and not self.ht:
            raise _Unsupported("capabilities beyond HTJ2K code-blocks in one layer")
        if self.style & (0x01 | 0x04 | 0x40) and not self.ht:
            raise _Unsupported("code-block style with several codeword segments")  # bypass, termall, mixed HT
        if self.layers < 1 or (self.layers > 1 and self.progression == _LRCP) or self.progression not in (
                _LRCP, _RLCP, _RPCL):
            raise _Unsupported("progression that interleaves resolutions")
        self.sop, self.eph = bool(scod & 0x02), bool(scod & 0x04)
        self.xcb, self.ycb = min(xcb, 15), min(ycb, 15)

    def one_precinct(self, r: int) -> bool:
        """Whether resolution ``r`` lies in one default (2^15-wide, 0-anchored) precinct: the only layout read."""
        n = self.levels - r
        x0, y0, x1, y1 = _ceil(self.x0, n), _ceil(self.y0, n), _ceil(self.x1, n), _ceil(self.y1, n)
        return -(-x1 >> 15) - (x0 >> 15) == 1 and -(-y1 >> 15) - (y0 >> 15) == 1

    def bands(self, r: int) -> list[tuple[int, int]]:
        """Code-blocks across and down in each subband of resolution ``r`` (its only precinct)."""
        if r == 0:
            n = self.levels
            boxes = [(_ceil(self.x0, n), _ceil(self.y0, n), _ceil(self.x1, n), _ceil(self.y1, n))]
        else:
            n = self.levels - r + 1
            h = 1 << (n - 1)
            boxes = [(_ceil(self.x0 - h * xo, n), _ceil(self.y0 - h * yo, n),
                      _ceil(self.x1 - h * xo, n), _ceil(self.y1 - h * yo, n)) for xo, yo in ((1, 0), (0, 1), (1, 1))]
        return [((-(-bx1 >> self.xcb) - (bx0 >> self.xcb)) if bx1 > bx0 else 0,
                 (-(-by1 >> self.ycb) - (by0 >> self.ycb)) if by1 > by0 else 0) for bx0, by0, bx1, by1 in boxes]


def _ceil(a: int, n: int) -> int:
    return -(-a >> n)


def _main_header(data, levels: int) -> tuple[list[bytes], _Coding, int]:
    """The main header's kept segments, the coding, and where the first tile-part starts."""
    if len(data) < 4 or struct.unpack_from(">H", data, 0)[0] != SOC:
        raise _Unsupported("no SOC")
    main, siz, cod, cap = [], None, None, None
    pos = 2
    for marker, start, stop in _segments(data, pos, len(data)):
        if marker not in _KEPT_MAIN | {TLM, PLM, COM}:
            raise _Unsupported(f"main header marker {marker:#06x}")
        if marker in (SIZ, COD, CAP) and {SIZ: siz, COD: cod, CAP: cap}[marker] is not None:
            raise _Unsupported("a second SIZ, COD or CAP")
        if marker == SIZ:
            siz = data[start:stop]
        elif marker == COD:
            cod = data[start:stop]
        elif marker == CAP:
            cap = data[start:stop]
        if marker in _KEPT_MAIN:
            main.append(bytes(data[start:stop]))
        pos = stop
    if siz is None or cod is None:
        raise _Unsupported("no SIZ or COD")
    coding = _Coding(siz, cod, cap)
    if levels > coding.levels:
        raise _Unsupported("more levels asked than the codestream has")
    return main, coding, pos


def _tile_header(data, at: int, end: int, first: bool, tile_header: list[bytes]) -> int:
    """Reads a tile-part's header (after its SOT) into ``tile_header``; returns where its data starts (past SOD)."""
    for marker, start, stop in _segments(data, at, end):
        if marker not in {PLT, COM} | (_KEPT_TILE if first else set()):
            raise _Unsupported(f"tile-part header marker {marker:#06x}")
        if marker in _KEPT_TILE:
            tile_header.append(bytes(data[start:stop]))
        at = stop
    if struct.unpack_from(">H", data, at)[0] != SOD:
        raise _Unsupported("no SOD")
    return at + 2


def _coarse(data, levels: int) -> bytes | None:
    main, coding, pos = _main_header(data, levels)
    eoc = _end_of_codestream(data)
    # the tile's data, over all its tile-parts; every length must add up to the codestream's
    pieces, tile_header, declared = [], [], set()
    while pos + 12 <= eoc:
        marker, lsot, isot, psot, tpsot, tnsot = struct.unpack_from(">HHHIBB", data, pos)
        if marker != SOT or lsot != 10 or isot != 0 or tpsot != len(pieces):
            raise _Unsupported("not a tile-part of the one tile")
        declared.add(tnsot)
        end = pos + psot if psot else eoc
        if end > eoc or psot and psot < 14:
            raise _Unsupported("tile-part runs past the codestream")
        pieces.append(data[_tile_header(data, pos + 12, end, not pieces, tile_header):end])
        pos = end
    if not pieces or pos != eoc:
        raise _Unsupported("the tile-parts' lengths do not add up to the codestream's")
    if declared - {0, len(pieces)}:
        raise _Unsupported("a tile-part count other than the tile-parts found")
    body = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
    return b"\xff\x4f" + b"".join(main) + _cut(body, coding, levels, tile_header)


def _coarse_start(data, levels: int, size: int) -> bytes:
    """``_coarse`` of a codestream ``size`` bytes long of which ``data`` has arrived, its first tile-part taken for
    the tile."""
    main, coding, pos = _main_header(data, levels)
    marker, lsot, isot, psot, tpsot, tnsot = struct.unpack_from(">HHHIBB", data, pos)
    if marker != SOT or lsot != 10 or isot != 0 or tpsot != 0 or tnsot > 1 or not 14 <= psot <= size - pos:
        raise _Unsupported("not the first tile-part of the one tile")
    tile_header: list[bytes] = []
    end = pos + psot
    body = data[_tile_header(data, pos + 12, min(end, len(data)), True, tile_header):end]
    try:
        cut = _cut(body, coding, levels, tile_header)
    except _Short:
        if len(data) < end:
            raise
        raise _Unsupported("packet runs past the tile-part") from None  # several tile-parts: more bytes won't help
    return b"\xff\x4f" + b"".join(main) + cut


def _cut(body, coding: _Coding, levels: int, tile_header: list[bytes]) -> bytes:
    """The cut codestream after its main header: one tile-part holding the kept packets of ``body`` (the tile's
    data) and an empty packet for each left out, then EOC."""
    kept = coding.levels - levels  # resolutions 0 .. kept stay
    if not all(coding.one_precinct(r) for r in range(kept + 1)):
        raise _Unsupported("a resolution over several default precincts")
    cut = _prefix_length(body, coding, kept)
    data_out = bytes(body[:cut]) + _empty_packets(coding, kept, (coding.levels - kept) * coding.layers)
    header = b"".join(tile_header)
    sot = struct.pack(">HHHIBB", SOT, 10, 0, 12 + len(header) + 2 + len(data_out), 0, 1)
    return sot + header + b"\xff\x93" + data_out + b"\xff\xd9"


def _end_of_codestream(data) -> int:
    """Where the tile-parts must end: at the EOC marker (which DICOM fragments and some encoders pad with a byte or
    two of 0x00 or 0xFF), or at the end of the data where the encoder left EOC out."""
    stop = len(data)
    while stop > max(0, len(data) - 3) and data[stop - 1] in (0x00, 0xFF):
        stop -= 1
    if stop >= 2 and data[stop - 2] == 0xFF and data[stop - 1] == 0xD9:
        return stop - 2
    return len(data)


def _empty_packets(coding: _Coding, kept: int, count: int) -> bytes:
    """``count`` empty packets (a zero bit, padded), with an EPH marker where the codestream uses them, and an SOP
    marker carrying the packet number each stands in for (modulo 65536) where it uses those."""
    packet = b"\x00" + (b"\xff\x92" if coding.eph else b"")
    if not coding.sop:
        return packet * count
    first = (kept + 1) * coding.layers
    return b"".join(b"\xff\x91\x00\x04" + struct.pack(">H", (first + i) & 0xFFFF) + packet for i in range(count))


class _Bits:
    """Packet-header bits (B.10.1): most significant first; after a 0xFF byte the next byte's top bit is stuffed."""

    def __init__(self, data, pos: int) -> None:
        self.data, self.pos, self.byte, self.left, self.last = data, pos, 0, 0, 0

    def bit(self) -> int:
        if self.left == 0:
            self.left = 7 if self.last == 0xFF else 8
            self.last = self.byte = self.data[self.pos]
            self.pos += 1
        self.left -= 1
        return (self.byte >> self.left) & 1

    def bits(self, n: int) -> int:
        v = 0
        for _ in range(n):
            v = (v << 1) | self.bit()
        return v

    def align(self) -> int:
        """The position after the header: the rest of the byte is padding, and a final 0xFF is followed by one
        more (stuffed) byte."""
        if self.last == 0xFF:
            self.pos += 1
        return self.pos


class _TagTree:
    """A tag tree (B.10.2) over ``w`` x ``h`` leaves."""

    def __init__(self, w: int, h: int) -> None:
        self.dims = [(w, h)]
        while w * h > 1:
            w, h = (w + 1) // 2, (h + 1) // 2
            self.dims.append((w, h))
        self.value = [[1 << 30] * (a * b) for a, b in self.dims]
        self.low = [[0] * (a * b) for a, b in self.dims]

    def decode(self, bits: _Bits, x: int, y: int, threshold: int) -> bool:
        """Whether the leaf's value is below ``threshold``, reading the bits that tell."""
        path = []
        for level, (w, _) in enumerate(self.dims):
            path.append((level, (y >> level) * w + (x >> level)))
        low = 0
        for level, i in reversed(path):
            values, lows = self.value[level], self.low[level]
            if low > lows[i]:
                lows[i] = low
            else:
                low = lows[i]
            while low < threshold and low < values[i]:
                if bits.bit():
                    values[i] = low
                else:
                    low += 1
            lows[i] = low
        return self.value[0][path[0][1]] < threshold


def _passes(bits: _Bits) -> int:
    if not bits.bit():
        return 1
    if not bits.bit():
        return 2
    n = bits.bits(2)
    if n != 3:
        return 3 + n
    n = bits.bits(5)
    if n != 31:
        return 6 + n
    return 37 + bits.bits(7)


def _length_bits(n: int) -> int:
    if n > _MAX_LENGTH_BITS:
        raise _Unsupported("a codeword segment length wider than the decoder reads")
    return n


def _prefix_length(body, coding: _Coding, kept: int) -> int:
    """Bytes of ``body`` holding every packet of resolutions 0 .. ``kept`` (all layers)."""
    shapes = [coding.bands(r) for r in range(kept + 1)]
    if any(not (w and h) for bands in shapes for w, h in bands):
        raise _Unsupported("an empty subband")  # an image narrower than its levels: left to the decoder whole
    if coding.layers * sum(w * h for bands in shapes for w, h in bands) > MAX_CODE_BLOCKS:
        raise _Unsupported("more code-blocks than this reader reads")
    pos = 0
    for r in range(kept + 1):
        bands = [(w, h, _TagTree(w, h), _TagTree(w, h), {}, {}, {}) for w, h in shapes[r]]
        for layer in range(coding.layers):
            if coding.sop and bytes(body[pos:pos + 2]) == b"\xff\x91":
                pos += 6
            bits = _Bits(body, pos)
            length = 0
            if bits.bit():
                for w, h, inclusion, zeros, included, lblock, total in bands:
                    for y in range(h):
                        for x in range(w):
                            i = y * w + x
                            if i in included:
                                if not bits.bit():
                                    continue
                            else:
                                if not inclusion.decode(bits, x, y, layer + 1):
                                    continue
                                included[i] = True
                                threshold = 1
                                while not zeros.decode(bits, x, y, threshold):
                                    threshold += 1
                                    if threshold > _MAX_BITPLANES:
                                        raise _Unsupported("zero bit-planes beyond any precision")
                                lblock[i], total[i] = 3, 0
                            passes = _passes(bits)
                            total[i] += passes
                            if total[i] > _MAX_PASSES:
                                raise _Unsupported("passes beyond one codeword segment")
                            while bits.bit():
                                lblock[i] += 1
                                if lblock[i] > _MAX_LBLOCK:
                                    raise _Unsupported("code-block length beyond any codestream")
                            if coding.ht:  # the cleanup pass, then the refinement passes (as OpenJPEG reads them)
                                if passes > 3:  # placeholder passes: the standard and OpenJPEG read these apart
                                    raise _Unsupported("HT placeholder passes")
                                length += bits.bits(_length_bits(lblock[i]))
                                if passes > 1:
                                    length += bits.bits(_length_bits(lblock[i] + (passes - 1).bit_length() - 1))
                            else:
                                length += bits.bits(_length_bits(lblock[i] + passes.bit_length() - 1))
            pos = bits.align()
            if coding.eph:
                if bytes(body[pos:pos + 2]) != b"\xff\x92":
                    raise _Unsupported("EPH marker missing")
                pos += 2
            pos += length
            if pos > len(body):
                raise _Short("packet runs past the tile's data")
    return pos
