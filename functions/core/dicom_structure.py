"""Bounds on a DICOM file's structure, checked on its raw bytes before pydicom parses it.

pydicom holds every element of a file in memory (hundreds of bytes each, however small in the file), reads the
whole of a deflated data set into memory before it parses it, and gathers every fragment of encapsulated pixel
data: a 32 MB file of 4 million empty elements held 1.35 GB for 23 s, and 190 KB of deflated zeros inflate to
200 MB. This walk counts the elements (nested ones and pixel-data fragments included) with a cap, and inflates a
deflated data set with a cap, at a cost proportional to the cap and never to the file. It reads only tags,
lengths and the transfer syntax; it never keeps or reports a value.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from core.rejections import MAX_DECODED_BYTES, InvalidImageError, RejectionReason

MAX_ELEMENTS = 20_000
"""Elements a DICOM file may hold, counting those inside sequences and the fragments of its pixel data. A chest
radiograph's header has a few hundred (a few thousand with vendors' private elements); pydicom parses 20,000 in
about 0.1 s and 7 MB."""
MAX_INFLATED_BYTES = MAX_DECODED_BYTES
"""A deflated data set (Deflated Explicit VR Little Endian) may inflate to at most the decode budget."""

TOO_MANY_ELEMENTS = f"the DICOM file has more than {MAX_ELEMENTS:,} elements"
INFLATES_TOO_FAR = f"the deflated DICOM data set inflates to more than {MAX_INFLATED_BYTES:,} bytes"
UNREADABLE_DEFLATE = "the deflated DICOM data set could not be inflated"

_INFLATE_CHUNK = 1 << 20
_PREAMBLE_AND_PREFIX = 132
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
_PIXEL_DATA = (0x7FE0, 0x0010)
# Explicit-VR elements with these VRs have two reserved bytes and a 4-byte length; the others a 2-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_TRANSFER_SYNTAX_TAG = (0x0002, 0x0010)
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"


@dataclass
class _Level:
    """One level of nesting: where it ends (None: at its delimiter), how it is encoded, and what it holds."""

    end: int | None
    implicit: bool
    little: bool
    kind: str  # "dataset", "sequence", "item" or "fragments"


def check_structure(data: bytes) -> bytes | None:
    """Raise ``DECOMPRESSION_BOMB`` when the file (with its 128-byte preamble) holds more than ``MAX_ELEMENTS``
    elements or its deflated data set inflates past ``MAX_INFLATED_BYTES``; return the inflated data set of a
    deflated file (the caller may drop it), else None."""
    counter = _Counter()
    inflated = None
    try:
        position, syntax = _walk_file_meta(data, counter)
        body, start = data, position
        if syntax == _DEFLATED_LE:
            inflated = _inflate(data[position:])
            body, start = inflated, 0
        little = syntax != _EXPLICIT_BE
        implicit = syntax == _IMPLICIT_LE
        if start + 6 <= len(body):
            # pydicom follows the encoding the first element shows when it contradicts the transfer syntax.
            implicit = not _looks_like_vr(body[start + 4 : start + 6])
        _walk(body, start, _Level(len(body), implicit, little, "dataset"), counter)
    except struct.error:
        # A header cut off inside an element's tag or length: nothing follows it for pydicom to parse either.
        pass
    return inflated


class _Counter:
    """Counts elements and rejects the file at the cap."""

    def __init__(self) -> None:
        self.count = 0

    def add(self) -> None:
        self.count += 1
        if self.count > MAX_ELEMENTS:
            raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, TOO_MANY_ELEMENTS)


def _walk_file_meta(data: bytes, counter: _Counter) -> tuple[int, str]:
    """Count the file meta elements (group 2, always explicit VR little endian); return where the data set starts
    and the transfer syntax UID."""
    position, syntax = _PREAMBLE_AND_PREFIX, ""
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        counter.add()
        _, length, position = _explicit_header(data, position, "<")
        if length == _UNDEFINED:
            break
        if (group, element) == _TRANSFER_SYNTAX_TAG:
            syntax = data[position : position + length].rstrip(b"\x00 ").decode("ascii", "replace")
        position += length
    return position, syntax


def _inflate(deflated: bytes) -> bytes:
    """The inflated data set, once a first pass that keeps nothing has found it within the cap."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, pending = 0, deflated
    try:
        while pending and not inflater.eof:
            size += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if size > MAX_INFLATED_BYTES:
                raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, INFLATES_TOO_FAR)
            pending = inflater.unconsumed_tail
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated)
    except zlib.error:
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_DEFLATE) from None


def _explicit_header(data: bytes, position: int, endian: str) -> tuple[bytes, int, int]:
    """The VR and value length of the explicit-VR element at ``position``, and where its value starts."""
    vr = data[position + 4 : position + 6]
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from(f"{endian}I", data, position + 8)
        return vr, length, position + 12
    (length,) = struct.unpack_from(f"{endian}H", data, position + 6)
    return vr, length, position + 8


def _looks_like_vr(raw: bytes) -> bool:
    """pydicom's test: two upper-case ASCII letters."""
    return len(raw) == 2 and 0x40 < raw[0] < 0x5B and 0x40 < raw[1] < 0x5B


def _walk(data: bytes, position: int, top: _Level, counter: _Counter) -> None:
    """Count every element header from ``position`` on. A value that holds a data set (a sequence, an item, a
    value that starts like an item) is walked into, bounded by its length; any other value is skipped. A value
    running past its container ends the container's walk there; one running past the file ends the walk."""
    levels = [top]
    while True:
        level = levels[-1]
        if level.end is not None and position >= level.end:
            if len(levels) == 1:
                return
            levels.pop()
            position = level.end
            continue
        if position + 8 > len(data):
            return
        endian = "<" if level.little else ">"
        group, element = struct.unpack_from(f"{endian}HH", data, position)
        counter.add()
        if group == 0xFFFE:
            (length,) = struct.unpack_from(f"{endian}I", data, position + 4)
            position += 8
            position = _delimiter(data, position, length, element, levels)
            continue
        if level.implicit:
            vr = b""
            (length,) = struct.unpack_from(f"{endian}I", data, position + 4)
            position += 8
        else:
            vr, length, position = _explicit_header(data, position, endian)
        # An element of VR UN that holds a sequence is encoded implicit VR little endian inside (PS3.5 6.2.2).
        nested_implicit, nested_little = (True, True) if vr == b"UN" else (level.implicit, level.little)
        if length == _UNDEFINED:
            pixels = (group, element) == _PIXEL_DATA or vr in {b"OB", b"OW"}
            kind = "fragments" if pixels else "sequence"
            levels.append(_Level(None, nested_implicit, nested_little, kind))
        elif vr == b"SQ" or (
            vr in {b"", b"UN"} and not _holds_pixels(group) and _starts_an_item(data, position, nested_little)
        ):
            levels.append(_Level(position + length, nested_implicit, nested_little, "sequence"))
        else:
            position += length


def _delimiter(data: bytes, position: int, length: int, element: int, levels: list[_Level]) -> int:
    """Handle an item or delimiter whose header ends at ``position``; return where the walk goes on."""
    level = levels[-1]
    if element == _ITEM:
        if level.kind == "fragments":
            return position + length if length != _UNDEFINED else len(data)
        implicit = level.implicit or not _looks_like_vr(data[position + 4 : position + 6])
        end = None if length == _UNDEFINED else position + length
        levels.append(_Level(end, implicit, level.little, "item"))
    elif element in {_ITEM_END, _SEQUENCE_END}:
        # A delimiter closes the innermost open item (or sequence, or fragments) not inside a bounded level.
        closes = {"item"} if element == _ITEM_END else {"sequence", "fragments"}
        for depth in range(len(levels) - 1, 0, -1):
            if levels[depth].end is not None:
                break
            if levels[depth].kind in closes:
                del levels[depth:]
                break
    return position


def _holds_pixels(group: int) -> bool:
    """Pixel data and overlay groups: their values are never sequences, whatever their first bytes are."""
    return group == 0x7FE0 or 0x6000 <= group <= 0x60FF


def _starts_an_item(data: bytes, position: int, little: bool) -> bool:
    return data[position : position + 4] == (b"\xfe\xff\x00\xe0" if little else b"\xff\xfe\xe0\x00")
