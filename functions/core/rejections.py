"""Why an upload can never be scored: the reasons, the error that carries one, and the limits that decide them.

Every module that rejects a file (preprocessing, DICOM decoding, the scoring pipeline) imports from here, so none
of them imports another for its error type.
"""

from __future__ import annotations

from enum import StrEnum

MIN_SIDE = 64
"""Images whose shorter side is below this many pixels cannot be a chest X-ray and are rejected."""

MAX_PIXELS = 25_000_000
"""Images above this many pixels (5,000 x 5,000) are treated as decompression bombs. The largest flat-panel
detectors give about 4,300 x 4,300 pixels at 16 bits (18.5 megapixels), which pass with room to spare; the README
states the same figures, and a test holds the two together."""

MAX_JPEG_SCANS = 64
"""A JPEG with more scans than this is a decompression bomb: every scan makes the decoder walk the whole image
again (a few hundred kilobytes of 1,000 scans took 8 s to decode at 5,000 x 5,000 pixels). libjpeg's progressive
files have at most about a dozen scans."""

MAX_DECODED_BYTES = 100_000_000
"""Budget for the decoded pixels of one file, counted across every frame, channel and bit depth before anything is
decoded: 25 megapixels of 8-bit RGBA, or a 4,300 x 4,300 16-bit film (37 MB) with room to spare. The scoring
function has 1,024 MB; a file over budget is rejected as ``DECOMPRESSION_BOMB`` and affects only its own record."""


MAX_JPEG_COEFFICIENT_BYTES = 128_000_000
"""Budget for the DCT coefficients libjpeg holds for the whole image of a progressive or multi-scan JPEG (2 bytes
for every pixel of every component, whatever scale it decodes at), on top of ``MAX_DECODED_BYTES``: RGB 4:4:4 up to
about 21 megapixels (a 4,300 x 4,300 one holds 111 MB), 4:2:0 colour and gray up to the pixel limit."""


class RejectionReason(StrEnum):
    """Why an input file can never be scored, however often it is retried."""

    EMPTY = "EMPTY_FILE"
    TOO_LARGE = "FILE_TOO_LARGE"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    CORRUPT = "CORRUPT_IMAGE"
    TOO_SMALL = "IMAGE_TOO_SMALL"
    DECOMPRESSION_BOMB = "DECOMPRESSION_BOMB"
    OBJECT_GONE = "OBJECT_NOT_FOUND"
    """The notified object version (or its whole bucket) was deleted before it could be read."""
    OBJECT_ARCHIVED = "OBJECT_ARCHIVED"
    """The object is in an archive storage class or tier: it cannot be read until it is restored."""
    DECODE_TIMEOUT = "DECODE_TIMEOUT"
    """Decoding the file, alone in a child process, ran past its wall time on every delivery the pipeline allows
    (``scoring.pipeline.DECODE_TIMEOUT_VERDICT_RECEIVE``): each overrun before that was retried as transient."""
    NOT_A_CHEST_XRAY = "NOT_A_CHEST_XRAY"
    """The file decodes, but what it shows is not a chest radiograph the model can read (blank, noise, a photograph,
    a document, another body part): the input gate of the model's artifact refused it."""
    OUTSIDE_VALIDATED_POPULATION = "OUTSIDE_VALIDATED_POPULATION"
    """The upload states a patient age (DICOM ``PatientAge`` or the object metadata ``patient-age``) outside the
    ages the model was validated on (``core.population``); an upload that states none is scored."""
    NON_DIAGNOSTIC_IMAGE = "NON_DIAGNOSTIC_IMAGE"
    """A chest film, but not one that can be read: smaller than the model's input, only part of the film, the lungs
    covered, or too blurred; the detail names which (``core.screening``)."""
    INVERTED_IMAGE = "INVERTED_IMAGE"
    """A chest film with its grey levels inverted (bone dark, air bright)."""
    ROTATED_IMAGE = "ROTATED_IMAGE"
    """A chest film turned by 90, 180 or 270 degrees."""


class InvalidImageError(ValueError):
    """A permanent fault in an input file: it is rejected with a specific reason, never retried."""

    def __init__(self, reason: RejectionReason, detail: str) -> None:
        """``detail`` is a fixed text chosen by the code (it lands in the table, the logs and the result event):
        never a value read from the file, nor an exception message that may quote one."""
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
