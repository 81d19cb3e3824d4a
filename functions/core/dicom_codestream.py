"""The first frame of an encapsulated DICOM file, checked against its data set from the codestream's own header.

The decoders decode a codestream at the size its own header declares, whatever the data set's Rows and Columns
say: a 6 KB JPEG-LS frame declaring 20,000 x 20,000 inside a file that states 512 x 512 held 2 GB. So before a
frame is decoded its codestream header is read (JPEG's SOFn and JPEG-LS's SOF55 through ``core.decode_budget``,
JPEG 2000's SIZ, RLE's segment table and the length each segment decodes to) and the frame is refused when the
image it declares is larger than the data set's (rows, columns, samples, bits allocated) or otherwise differs from
it, when it has more than ``MAX_JPEG_SCANS`` scans, or when its decoder's own buffers (a progressive JPEG's
coefficients) would take the decode past ``MAX_DECODED_BYTES``. Every encapsulated syntax that has a decoder in the
function (JPEG, JPEG-LS, JPEG 2000, RLE) is read here; uncompressed pixel data is the data set's size by
construction, and a syntax without a decoder is never decoded. Only tags and sizes are read; nothing read here
reaches an error text.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.encaps import get_frame
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

from core import decode_budget
from core.rejections import MAX_DECODED_BYTES, MAX_JPEG_SCANS, InvalidImageError, RejectionReason

LARGER_THAN_STATED = "the DICOM frame's codestream declares a larger image than the DICOM header"
DIFFERS_FROM_STATED = "the DICOM frame's codestream declares another image than the DICOM header"
UNREADABLE_CODESTREAM = "the DICOM frame's codestream header could not be read"
TOO_MANY_SCANS = f"the DICOM frame's JPEG has more than {MAX_JPEG_SCANS} scans"
OVER_BUDGET = f"the DICOM frame's decoder needs more than {MAX_DECODED_BYTES:,} bytes"

_J2K_SIZ = b"\xff\x4f\xff\x51"
"""A JPEG 2000 codestream starts with SOC, then SIZ."""
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_RLE_HEADER_BYTES = 64
_JPEG_LS_SOF = 0xF7
_PACKBITS_NOTHING = 128
"""The PackBits header byte that stands for no run; below it a literal run, above it a repeat."""


@dataclass(frozen=True)
class StatedImage:
    """The image the data set states for a frame."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int


@dataclass(frozen=True)
class DeclaredImage:
    """The image a frame's codestream declares, and what decoding it costs beyond the decoded frame."""

    rows: int
    columns: int
    components: int
    precision: int
    """Bits of the widest component."""
    scans: int = 0
    decoder_bytes: int = 0
    """What the decoder holds beside its output (a progressive or multi-scan JPEG's coefficients)."""


def check_first_frame(pixel_data: bytes, syntax: str, stated: StatedImage, frames: int, budgeted: int) -> None:
    """Refuse the first frame of encapsulated ``pixel_data`` (transfer syntax ``syntax``, ``frames`` frames) when
    its codestream disagrees with ``stated``, has too many scans, or its decoder's own buffers would take the
    ``budgeted`` bytes of the decode (frame, output, conversion) past ``MAX_DECODED_BYTES``. Syntaxes that are not
    encapsulated are left alone."""
    reader = _READERS.get(syntax)
    if reader is None:
        return
    try:
        frame = get_frame(pixel_data, 0, number_of_frames=frames)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # pydicom raises many types for malformed fragments; each is corrupt.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_CODESTREAM) from None
    declared = reader(frame, stated)
    _compare(declared, stated)
    if declared.scans > MAX_JPEG_SCANS:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, TOO_MANY_SCANS)
    if budgeted + declared.decoder_bytes > MAX_DECODED_BYTES:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, OVER_BUDGET)


def _compare(declared: DeclaredImage, stated: StatedImage) -> None:
    """A codestream larger than the stated image on any count is a bomb; one that differs otherwise is corrupt.
    Its precision may be below the bits allocated (a 12-bit film in 16-bit words), never above."""
    larger = (
        declared.rows > stated.rows
        or declared.columns > stated.columns
        or declared.components > stated.samples
        or declared.precision > stated.bits_allocated
    )
    if larger:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, LARGER_THAN_STATED)
    if (declared.rows, declared.columns, declared.components) != (stated.rows, stated.columns, stated.samples):
        raise InvalidImageError(RejectionReason.CORRUPT, DIFFERS_FROM_STATED)
    if declared.precision < 1:
        raise InvalidImageError(RejectionReason.CORRUPT, DIFFERS_FROM_STATED)


def _jpeg(frame: bytes, stated: StatedImage) -> DeclaredImage:
    """A JPEG or JPEG-LS frame: its SOF, its scans, and the coefficient buffer of a progressive or multi-scan
    one (``core.decode_budget``, as for a bare JPEG)."""
    header = decode_budget.jpeg_frame_header(frame)
    if header is None:
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_CODESTREAM)
    scans = decode_budget.count_scans(frame)
    coefficients = 0
    if header.marker != _JPEG_LS_SOF:  # JPEG-LS codes samples, never DCT coefficients.
        layout = decode_budget.JpegLayout(header.width, header.height, header.sampling, header.progressive, scans)
        coefficients = decode_budget.jpeg_cost(layout, 0, 0).coefficient_bytes
    return DeclaredImage(
        rows=header.height,
        columns=header.width,
        components=len(header.sampling),
        precision=header.precision,
        scans=scans,
        decoder_bytes=coefficients,
    )


def _j2k(frame: bytes, stated: StatedImage) -> DeclaredImage:
    """A JPEG 2000 frame: the image area and components of its SIZ segment (inside a JP2 file's codestream box
    when an encoder wrapped it in one)."""
    start = _j2k_codestream_start(frame)
    if start is None or len(frame) < start + 42:
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_CODESTREAM)
    # SIZ: marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, tile size and offset (4 values), Csiz, then per component
    # Ssiz (precision - 1, the top bit for signed), XRsiz, YRsiz.
    width, height, x_offset, y_offset = struct.unpack_from(">4I", frame, start + 8)
    (components,) = struct.unpack_from(">H", frame, start + 40)
    precisions = frame[start + 42 : start + 42 + 3 * components : 3]
    if components == 0 or len(precisions) < components or width <= x_offset or height <= y_offset:
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_CODESTREAM)
    return DeclaredImage(
        rows=height - y_offset,
        columns=width - x_offset,
        components=components,
        precision=max((ssiz & 0x7F) + 1 for ssiz in precisions),
    )


def _j2k_codestream_start(frame: bytes) -> int | None:
    """Where the codestream's SOC is: at the start, or in the ``jp2c`` box of a JP2 file."""
    if frame.startswith(_J2K_SIZ):
        return 0
    if not frame.startswith(_JP2_SIGNATURE):
        return None
    position = 0
    while position + 8 <= len(frame):
        length, kind = struct.unpack_from(">I4s", frame, position)
        header = 8
        if length == 1 and position + 16 <= len(frame):
            (length,) = struct.unpack_from(">Q", frame, position + 8)
            header = 16
        if kind == b"jp2c":
            start = position + header
            return start if frame[start : start + 4] == _J2K_SIZ else None
        if length < header:
            return None  # A box running to the end (0) that is not the codestream, or a malformed length.
        position += length
    return None


def _rle(frame: bytes, stated: StatedImage) -> DeclaredImage:
    """An RLE frame: one segment per byte of each sample, each decoding to exactly rows x columns bytes. pydicom
    decodes a whole segment before it compares its length, and PackBits expands up to 64 times, so each segment's
    decoded length is counted from its run headers first, stopping as soon as it passes the stated size."""
    if len(frame) < _RLE_HEADER_BYTES:
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_CODESTREAM)
    header = struct.unpack_from("<16I", frame)
    segments, offsets = header[0], [*header[1 : 1 + min(header[0], 15)], len(frame)]
    bytes_per_sample = -(-stated.bits_allocated // 8)
    if segments != stated.samples * bytes_per_sample or any(
        not _RLE_HEADER_BYTES <= start <= end <= len(frame) for start, end in itertools.pairwise(offsets)
    ):
        raise InvalidImageError(RejectionReason.CORRUPT, DIFFERS_FROM_STATED)
    plane = stated.rows * stated.columns
    for start, end in itertools.pairwise(offsets):
        if _packbits_length(frame, start, end, most=plane) > plane:
            raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, LARGER_THAN_STATED)
    return DeclaredImage(stated.rows, stated.columns, stated.samples, stated.bits_allocated)


def _packbits_length(data: bytes, start: int, end: int, most: int) -> int:
    """The length ``data[start:end]`` decodes to as PackBits, counted until it passes ``most``: a header byte n
    below 128 is followed by n + 1 literal bytes, one above 128 repeats the next byte 257 - n times, 128 is
    nothing. Its cost is one step per run, at most ``most`` steps, whatever the segment's length."""
    position, length = start, 0
    while position < end and length <= most:
        control = data[position]
        if control < _PACKBITS_NOTHING:
            length += min(control + 1, end - position - 1)
            position += control + 2
        elif control > _PACKBITS_NOTHING:
            length += 257 - control
            position += 2
        else:
            position += 1
    return length


_READERS: dict[str, Callable[[bytes, StatedImage], DeclaredImage]] = {
    **dict.fromkeys(JPEGTransferSyntaxes, _jpeg),
    **dict.fromkeys(JPEGLSTransferSyntaxes, _jpeg),
    **dict.fromkeys(JPEG2000TransferSyntaxes, _j2k),
    RLELossless: _rle,
}
