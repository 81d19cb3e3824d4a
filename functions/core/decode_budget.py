"""What decoding a JPEG or PNG will cost, read from its header before any pixel is decoded.

The cost counts the bytes every full-size buffer holds at once while a file is decoded and reduced to grayscale:
the decoder's pixels in Pillow's storage (1, 2 or 4 bytes a pixel by mode), the grayscale image the conversion
writes, and the strips it converts through; beside them, libjpeg's coefficient buffer of a progressive or
multi-scan JPEG has its own budget. A file whose pixels exceed ``MAX_DECODED_BYTES``, a JPEG whose coefficients
exceed ``MAX_JPEG_COEFFICIENT_BYTES`` or with more than ``MAX_JPEG_SCANS`` scans, is a decompression bomb and is
rejected before its pixels are decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from core.rejections import (
    MAX_DECODED_BYTES,
    MAX_JPEG_COEFFICIENT_BYTES,
    MAX_JPEG_SCANS,
    InvalidImageError,
    RejectionReason,
)

STRIP_ROWS = 64
"""Rows converted to grayscale at a time: intermediate modes (RGBA, float64) never exist at full size."""

STRIP_BYTES_PER_PIXEL = 32
"""The most any conversion holds per pixel of one strip: 16-bit values in three float64 temporaries (24 bytes),
or a strip of RGBA, its black background, their composite and the gray result (17 bytes), with room to spare."""

COEFFICIENT_BYTES_PER_PIXEL = 2
"""libjpeg keeps one 16-bit DCT coefficient per pixel of every component of a progressive or multi-scan JPEG,
whatever scale it decodes at."""

OVER_BYTES = f"decoding would need more than {MAX_DECODED_BYTES:,} bytes of pixels"
TOO_MANY_SCANS = f"the JPEG has more than {MAX_JPEG_SCANS} scans"
OVER_COEFFICIENT_BYTES = f"the JPEG's coefficients would need more than {MAX_JPEG_COEFFICIENT_BYTES:,} bytes"

_TWO_BYTE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})


def pillow_bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in Pillow's storage: RGB, LA and every other mode use four."""
    if mode in _ONE_BYTE_MODES:
        return 1
    return 2 if mode in _TWO_BYTE_MODES else 4


@dataclass(frozen=True)
class JpegLayout:
    """What the header and the marker stream of a JPEG say about the cost of decoding it."""

    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]
    """Horizontal and vertical sampling factors of each component."""
    progressive: bool
    scans: int


@dataclass(frozen=True)
class JpegFrameHeader:
    """A JPEG's frame header (SOFn, or JPEG-LS's SOF55): what its decoder will allocate for."""

    marker: int
    """The SOF marker's second byte: 0xC0-0xCF for the JPEG processes, 0xF7 for JPEG-LS."""
    precision: int
    height: int
    width: int
    sampling: tuple[tuple[int, int], ...]
    """Horizontal and vertical sampling factors of each component."""

    @property
    def progressive(self) -> bool:
        """Whether the frame is progressive (SOF2, SOF6, SOF10, SOF14)."""
        return self.marker in {0xC2, 0xC6, 0xCA, 0xCE}


_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
"""Frame headers: every SOFn (not DHT, JPG, DAC, which share the range) and JPEG-LS's SOF55."""


def _header_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """Each marker before the first scan and where it starts, skipping segments by their lengths (so a thumbnail
    inside EXIF is never seen); the first SOS is the last one given. Stops at anything that is not a marker."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return  # Not a marker where one must be: the decoder rejects the file as corrupt.
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1  # A fill byte before a marker.
            continue
        yield marker, position
        if marker == 0xDA:
            return
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:
            position += 2  # A marker without a length.
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")


def jpeg_frame_header(data: bytes) -> JpegFrameHeader | None:
    """The first frame header of a JPEG or JPEG-LS codestream before its first scan; None without a whole one."""
    for marker, position in _header_markers(data):
        if marker not in _SOF_MARKERS:
            continue
        if position + 10 > len(data):
            return None
        precision = data[position + 4]
        height = int.from_bytes(data[position + 5 : position + 7], "big")
        width = int.from_bytes(data[position + 7 : position + 9], "big")
        components = data[position + 9]
        table = data[position + 10 : position + 10 + 3 * components]
        if components == 0 or len(table) < 3 * components:
            return None
        sampling = tuple((table[i + 1] >> 4, table[i + 1] & 0x0F) for i in range(0, len(table), 3))
        return JpegFrameHeader(marker, precision, height, width, sampling)
    return None


def count_scans(data: bytes) -> int:
    """The number of scans (SOS markers) of the image a JPEG holds.

    The marker segments before the first scan are skipped by their lengths, so a thumbnail inside EXIF is not
    counted; from there a 0xFF inside entropy-coded data is always followed by a stuffed zero (in JPEG-LS, by a
    byte below 0x80), so every 0xFF 0xDA is a scan (a table segment between scans could hold the pair too, which
    can only over-count)."""
    for marker, position in _header_markers(data):
        if marker == 0xDA:
            return data.count(b"\xff\xda", position)
    return 0


@dataclass(frozen=True)
class JpegCost:
    """Bytes decoding a JPEG holds: libjpeg's coefficient buffer, and the pixels with their conversion to gray."""

    coefficient_bytes: int
    pixel_bytes: int


def jpeg_cost(layout: JpegLayout, output_bytes: int, conversion_bytes: int) -> JpegCost:
    """Bytes of decoding a JPEG whose decoder writes ``output_bytes`` and whose conversion to gray holds
    ``conversion_bytes`` on top."""
    coefficients = 0
    if layout.progressive or layout.scans > 1:
        h_max = max(h for h, _ in layout.sampling)
        v_max = max(v for _, v in layout.sampling)
        for h, v in layout.sampling:
            # Each component's blocks, rounded up to whole MCUs, as libjpeg allocates them.
            columns = -(-layout.width * h // h_max) // 8 + h
            rows = -(-layout.height * v // v_max) // 8 + v
            coefficients += columns * rows * 64 * COEFFICIENT_BYTES_PER_PIXEL
    return JpegCost(coefficients, output_bytes + conversion_bytes)


def check_jpeg(cost: JpegCost, scans: int) -> None:
    """Raise ``DECOMPRESSION_BOMB`` when a JPEG has too many scans, too many coefficient bytes or pixel bytes."""
    check(cost.pixel_bytes, scans)
    if cost.coefficient_bytes > MAX_JPEG_COEFFICIENT_BYTES:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, OVER_COEFFICIENT_BYTES)


def conversion_bytes(mode: str, width: int, height: int, *, oriented: bool) -> int:
    """Bytes the reduction of a decoded ``mode`` image to 8-bit gray holds beside the decoded pixels: the gray
    image and one strip's intermediates (nothing for an 8-bit gray image), and the transposed copy of the gray
    image when the EXIF orientation turns it."""
    gray = width * height
    converted = 0 if mode == "L" else gray + STRIP_ROWS * width * STRIP_BYTES_PER_PIXEL
    return converted + (gray if oriented else 0)


def check(decoded_bytes: int, scans: int = 0) -> None:
    """Raise ``DECOMPRESSION_BOMB`` (with the budget's fixed detail) when a file is over a decode budget."""
    if scans > MAX_JPEG_SCANS:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, TOO_MANY_SCANS)
    if decoded_bytes > MAX_DECODED_BYTES:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, OVER_BYTES)
