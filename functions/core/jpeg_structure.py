"""The marker structure of a JPEG, read without decoding a pixel, and the repairs of its benign deviations.

libjpeg only warns about two deviations that leave every pixel intact: bytes where a marker belongs (it skips
them, "extraneous bytes before marker") and a file that ends without its end-of-image marker after its last scan
("premature end of JPEG file"). Decoded in strict mode, both would be refused like damaged data. ``read_structure``
walks the markers by their lengths, drops the stray bytes it meets between marker segments, appends a missing end
marker, and notes the scans, so the decoder gets a file that differs from the upload only in what libjpeg itself
discards. Whether the data is complete is still the strict decoder's call: entropy-coded data that ends before its
scan's last block is "premature end of data segment" once the end marker follows it, and stays corrupt.
"""

from __future__ import annotations

from dataclasses import dataclass

END_OF_IMAGE = b"\xff\xd9"
MARKER_PREFIX = 0xFF
END_OF_IMAGE_MARKER = 0xD9
START_OF_SCAN = 0xDA
_WITHOUT_LENGTH = frozenset({0x00, 0x01, *range(0xD0, 0xD8)})
"""Stuffed zero, TEM and the restart markers: no length follows them."""
_PROGRESSIVE_FRAMES = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_RESTARTS = frozenset(range(0xD0, 0xD8))
_COEFFICIENTS = 64
_SCAN_BAND_BYTES = 3
"""Ss, Se and Ah/Al: the spectral band and successive approximation after a scan's components."""


@dataclass(frozen=True)
class ScanHeader:
    """What one start-of-scan segment says: its components, spectral band and successive-approximation bit."""

    components: tuple[int, ...]
    spectral_start: int
    spectral_end: int
    approximation_low: int


@dataclass(frozen=True)
class JpegStructure:
    """A JPEG's marker structure and its repaired bytes."""

    repaired: bytes
    """The file with the stray bytes between marker segments dropped and a missing end marker appended; the
    upload itself when it needs neither."""
    stray_bytes: int
    """Bytes dropped where a marker belonged."""
    missing_end: bool
    """The file ended without an end-of-image marker (one was appended)."""
    frame_components: tuple[int, ...]
    progressive: bool
    scans: tuple[ScanHeader, ...]
    boundaries: tuple[tuple[int, int], ...]
    """(offset in ``repaired``, marker code) of every marker that follows entropy-coded data: where stray bytes
    after a scan's data would sit, which only the decoder can tell from the data itself."""

    @property
    def scans_complete(self) -> bool:
        """Whether the scans carry every component in full: each in some scan of a sequential JPEG, every
        coefficient of each down to its last bit in a progressive one. A file cut between two scans is not."""
        if not self.frame_components or not self.scans:
            return False
        if not self.progressive:
            scanned = {component for scan in self.scans for component in scan.components}
            return scanned >= set(self.frame_components)
        for component in self.frame_components:
            final = [False] * _COEFFICIENTS
            for scan in self.scans:
                if component in scan.components and scan.approximation_low == 0:
                    for coefficient in range(scan.spectral_start, min(scan.spectral_end, _COEFFICIENTS - 1) + 1):
                        final[coefficient] = True
            if not all(final):
                return False
        return True


def read_structure(data: bytes) -> JpegStructure | None:
    """The structure of the JPEG ``data`` (which starts with SOI), or None when its marker segments run past its
    end or it has no scan: the decoder then refuses it as it would have."""
    repaired = bytearray(data[:2])
    position, stray, after_entropy = 2, 0, False
    frame_components: tuple[int, ...] = ()
    progressive, ended = False, False
    scans: list[ScanHeader] = []
    boundaries: list[tuple[int, int]] = []
    while position < len(data):
        if data[position] != MARKER_PREFIX:
            marker_at = data.find(b"\xff", position)
            marker_at = len(data) if marker_at < 0 else marker_at
            stray += marker_at - position  # Where a marker belongs: libjpeg skips these bytes with a warning.
            position = marker_at
            continue
        while position + 1 < len(data) and data[position + 1] == MARKER_PREFIX:
            position += 1  # Fill bytes before a marker, which the standard allows.
        if position + 1 >= len(data):
            break
        marker = data[position + 1]
        if after_entropy:
            boundaries.append((len(repaired), marker))
            after_entropy = False
        if marker == END_OF_IMAGE_MARKER:
            repaired += END_OF_IMAGE
            ended = True
            break
        if marker in _WITHOUT_LENGTH:
            repaired += data[position : position + 2]  # No length; the decoder judges them.
            position += 2
            continue
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if position + 4 > len(data) or end > len(data):
            return None
        segment = data[position:end]
        repaired += segment
        position = end
        if marker in _FRAMES:
            frame_components = _frame_components(segment)
            progressive = marker in _PROGRESSIVE_FRAMES
        elif marker == START_OF_SCAN:
            scans.append(_scan_header(segment))
            data_end = _entropy_end(data, position)
            repaired += data[position:data_end]
            position, after_entropy = data_end, True
    if not scans:
        return None
    if not ended:
        repaired += END_OF_IMAGE
    unchanged = stray == 0 and ended and len(repaired) == len(data)
    return JpegStructure(
        repaired=data if unchanged else bytes(repaired),
        stray_bytes=stray,
        missing_end=not ended,
        frame_components=frame_components,
        progressive=progressive,
        scans=tuple(scans),
        boundaries=tuple(boundaries),
    )


def without_bytes_before(data: bytes, offset: int, count: int) -> bytes:
    """``data`` without the ``count`` bytes that end at ``offset``."""
    return data[: max(offset - count, 0)] + data[offset:]


def _entropy_end(data: bytes, position: int) -> int:
    """Where the entropy-coded data starting at ``position`` ends: the first 0xFF that is neither a stuffed zero,
    a restart marker nor a fill byte (or the end of the file)."""
    while (candidate := data.find(b"\xff", position)) >= 0 and candidate + 1 < len(data):
        following = data[candidate + 1]
        if following == 0x00 or following in _RESTARTS:
            position = candidate + 2
        elif following == MARKER_PREFIX:
            position = candidate + 1
        else:
            return candidate
    return len(data)


def _frame_components(segment: bytes) -> tuple[int, ...]:
    """The component identifiers a start-of-frame segment declares (marker, length, precision, height, width,
    count, then three bytes a component)."""
    body = segment[9:]
    count = body[0] if body else 0
    return tuple(body[1 + 3 * index] for index in range(count) if 1 + 3 * index < len(body))


def _scan_header(segment: bytes) -> ScanHeader:
    """The components, spectral band and low approximation bit of a start-of-scan segment (marker, length,
    count, two bytes a component, then Ss, Se and Ah/Al)."""
    body = segment[4:]
    count = body[0] if body else 0
    components = tuple(body[1 + 2 * index] for index in range(count) if 1 + 2 * index < len(body))
    band = body[1 + 2 * count : 4 + 2 * count]
    if len(band) != _SCAN_BAND_BYTES:
        return ScanHeader(components, 0, -1, 0)  # Malformed: covers nothing; the decoder refuses it anyway.
    spectral_start, spectral_end, approximation = band
    return ScanHeader(components, spectral_start, spectral_end, approximation & 0x0F)
