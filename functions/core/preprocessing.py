"""The one preprocessing function shared by training and serving.

Training imports this module, so the pixels the model learns from and the pixels it is served can never drift
apart. It turns the bytes of an uploaded file into the model's input: decode, apply the EXIF orientation,
reduce to one grayscale channel, and resize to a square of ``INPUT_SIZE`` pixels. Intensity normalisation
happens inside the model, so the returned array stays plain ``uint8``.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, JpegImagePlugin

from core import decode_budget, jpeg_structure
from core.rejections import MAX_PIXELS, MIN_SIDE, InvalidImageError, RejectionReason

INPUT_SIZE = 224
"""Side of the square grayscale image the model reads."""


class ImageFormat(StrEnum):
    """Formats the scorer accepts, detected from the file's first bytes rather than its name."""

    JPEG = "JPEG"
    PNG = "PNG"
    DICOM = "DICOM"


@dataclass(frozen=True)
class ModelInput:
    """One decoded image ready for the model, with what was learned about the file on the way."""

    pixels: np.ndarray
    """``(INPUT_SIZE, INPUT_SIZE, 1)`` uint8 array."""
    image_format: ImageFormat
    original_width: int
    original_height: int
    stated_age_years: float | None = None
    """The patient age the file states (a DICOM's ``PatientAge``), in years; None when it states none."""


ENDS_BEFORE_LAST_SCAN = "the JPEG ends without its end marker before its last scan"

MAX_STRICT_DECODES = 12
"""Strict decodes one JPEG may take while the stray bytes after its scans are found and dropped."""

_EXTRANEOUS = re.compile(r"(\d+) extraneous bytes before marker 0x([0-9a-fA-F]{2})")
"""libjpeg's warning for bytes it skipped where a marker belongs (``JWRN_EXTRANEOUS_DATA``)."""
_PREMATURE_END = "premature end of data segment"
"""libjpeg's warning for entropy-coded data that ends before its scan's last block (``JWRN_HIT_MARKER``)."""


def detect_format(data: bytes) -> ImageFormat:
    """Name the format of ``data`` from its magic bytes, or raise ``InvalidImageError``."""
    if not data:
        raise InvalidImageError(RejectionReason.EMPTY, "the file has zero bytes")
    if data.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageFormat.PNG
    if (len(data) >= 132 and data[128:132] == b"DICM") or data.startswith(b"DICM"):
        return ImageFormat.DICOM  # With or without the 128-byte preamble.
    # The message never quotes the bytes: they may be the start of a patient document.
    raise InvalidImageError(RejectionReason.UNSUPPORTED_FORMAT, "not a JPEG, PNG or DICOM file signature")


@dataclass(frozen=True)
class DecodedImage:
    """A validated upload as 8-bit grayscale in display orientation, possibly draft-reduced, not yet resized."""

    grayscale: Image.Image
    image_format: ImageFormat
    original_width: int
    original_height: int
    stated_age_years: float | None = None
    """The patient age the file states (a DICOM's ``PatientAge``), in years; None when it states none."""


def preprocess(data: bytes, size: int = INPUT_SIZE) -> ModelInput:
    """Turn the bytes of a JPEG, PNG or DICOM file into the model's ``(size, size, 1)`` uint8 input."""
    return resize_for_model(decode(data, size), size)


def decode(data: bytes, size: int = INPUT_SIZE) -> DecodedImage:
    """Detect, validate and decode a file to grayscale; ``size`` lets large JPEGs decode at a reduced scale."""
    image_format = detect_format(data)
    stated_age: float | None = None
    if image_format is ImageFormat.DICOM:
        # pydicom is imported only when a DICOM file arrives, so JPEG and PNG scoring never pay for it.
        from core.dicom import decode_dicom  # noqa: PLC0415

        film = decode_dicom(data)
        grayscale, stated_age = film.grayscale, film.stated_age_years
        width, height = grayscale.size
    else:
        grayscale, (width, height) = _decode_with_pillow(data, image_format, size)
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(RejectionReason.TOO_SMALL, f"the shorter side is below {MIN_SIDE} px")
    return DecodedImage(grayscale, image_format, width, height, stated_age)


def resize_for_model(decoded: DecodedImage, size: int = INPUT_SIZE) -> ModelInput:
    """Resize the whole film to the model's square input.

    The reference copies of the data set were squashed to a square, so every film is resized the same way."""
    resized = decoded.grayscale.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.asarray(resized, dtype=np.uint8).reshape(size, size, 1)
    return ModelInput(
        pixels=pixels,
        image_format=decoded.image_format,
        original_width=decoded.original_width,
        original_height=decoded.original_height,
        stated_age_years=decoded.stated_age_years,
    )


def _decode_with_pillow(data: bytes, image_format: ImageFormat, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode within the decode budget: an 8-bit grayscale image in display orientation, and the file's full
    pixel size (a large JPEG is decoded at a reduced scale, as Pillow's draft mode would).

    Pillow reads the header; the budget (``core.decode_budget``) is checked before any pixel is decoded. JPEGs are
    decoded by libjpeg-turbo through simplejpeg in strict mode, so data that ends early or is damaged, which libjpeg
    only warns about and fills with gray, is corrupt. Every rejection has a fixed text: the decoders' messages and
    warnings may quote what the file holds."""
    too_many = InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, f"more than {MAX_PIXELS:,} pixels")
    undecodable = InvalidImageError(RejectionReason.CORRUPT, f"the {image_format.value} could not be decoded")
    structure = jpeg_structure.read_structure(data) if image_format is ImageFormat.JPEG else None
    if structure is not None:
        if structure.missing_end and not structure.scans_complete:
            raise InvalidImageError(RejectionReason.CORRUPT, ENDS_BEFORE_LAST_SCAN)
        data = structure.repaired  # Stray bytes between marker segments dropped, a missing end marker appended.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings (corrupt EXIF, odd chunks) go to stderr, i.e. the logs.
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a bomb must be an error, not a warning.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            image = Image.open(io.BytesIO(data), formats=[image_format.value])
            if image.width * image.height > MAX_PIXELS:
                raise too_many
            full_size = image.size
            if isinstance(image, JpegImagePlugin.JpegImageFile):
                orientation = _orientation(image)
                boundaries = structure.boundaries if structure is not None else ()
                grayscale = _decode_jpeg(data, image, size, boundaries, oriented=orientation is not None)
            else:
                # Checked before the pixels are decoded, then again once the orientation is known: a PNG's EXIF
                # chunk may follow its pixels, so Pillow reads it only while loading them.
                stored = image.width * image.height * decode_budget.pillow_bytes_per_pixel(image.mode)
                decode_budget.check(stored + decode_budget.conversion_bytes(image.mode, *image.size, oriented=False))
                image.load()
                orientation = _orientation(image)
                oriented = orientation is not None
                decode_budget.check(stored + decode_budget.conversion_bytes(image.mode, *image.size, oriented=oriented))
                grayscale = _to_grayscale(image)
            del image  # The decoded pixels go as soon as the gray image exists.
            if orientation is not None:
                # The conversion is pixel by pixel, so turning the gray image equals turning the decoded one.
                grayscale = grayscale.transpose(orientation)
        except InvalidImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_many from None
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001  # The decoders raise many types for malformed input; all are corrupt.
            raise undecodable from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
    return grayscale, full_size


_EXIF_TRANSPOSITIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transposition that shows the image upright, as ``ImageOps.exif_transpose`` applies it."""


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The transposition the image's EXIF orientation asks for, if any."""
    return _EXIF_TRANSPOSITIONS.get(image.getexif().get(ExifTags.Base.Orientation, 1))


def _decode_jpeg(
    data: bytes,
    header: JpegImagePlugin.JpegImageFile,
    size: int,
    boundaries: tuple[tuple[int, int], ...],
    *,
    oriented: bool,
) -> Image.Image:
    """Decode a JPEG whose header Pillow has read: gray, luminance-only JPEGs at Pillow's draft scale (the
    largest of 1/8, 1/4, 1/2 that keeps both sides at least ``size``), CMYK at full size through Pillow after a
    strict libjpeg pass has checked the data. ``boundaries`` are the markers that follow entropy-coded data
    (``JpegStructure.boundaries``)."""
    width, height = header.size
    layout = decode_budget.JpegLayout(
        width=width,
        height=height,
        sampling=tuple((h, v) for _, h, v, _ in header.layer) or ((1, 1),),
        progressive="progressive" in header.info or "progression" in header.info,
        scans=decode_budget.count_scans(data),
    )
    if header.mode in {"L", "RGB", "YCbCr"}:
        scale = next((s for s in (8, 4, 2) if min(width // size, height // size) >= s), 1)
        out_width, out_height = -(-width // scale), -(-height // scale)
        budget = decode_budget.jpeg_cost(layout, out_width * out_height, out_width * out_height if oriented else 0)
        decode_budget.check_jpeg(budget, layout.scans)
        # libjpeg converts to luminance itself (for YCbCr it keeps the Y channel), as Pillow's draft("L") asks it.
        pixels = _decode_strictly(
            data, boundaries, colorspace="GRAY", min_width=out_width, min_height=out_height, min_factor=1.0
        )
        if pixels.shape[:2] != (out_height, out_width):
            raise InvalidImageError(RejectionReason.CORRUPT, "the JPEG could not be decoded")
        return Image.frombuffer("L", (out_width, out_height), pixels, "raw", "L", 0, 1)
    stored = width * height * decode_budget.pillow_bytes_per_pixel(header.mode)
    budget = decode_budget.jpeg_cost(
        layout, stored, decode_budget.conversion_bytes(header.mode, width, height, oriented=oriented)
    )
    decode_budget.check_jpeg(budget, layout.scans)
    _decode_strictly(data, boundaries, colorspace="CMYK", min_width=0, min_height=0, min_factor=8.0)
    header.load()
    return _to_grayscale(header)


def _decode_strictly(data: bytes, boundaries: tuple[tuple[int, int], ...], **options: str | int | float) -> np.ndarray:
    """Decode with libjpeg-turbo in strict mode, where every warning is an error, except stray bytes between a
    scan's data and the next marker, which libjpeg skips ("N extraneous bytes before marker 0xXX"): they are the N
    bytes before one of the ``boundaries`` with that marker, and are dropped, trying the boundaries in order. A
    wrong guess cuts real data and the decoder says so ("premature end of data segment"), so the next one is
    tried; what is returned is always a strict decode, of at most ``MAX_STRICT_DECODES`` attempts."""
    pending = list(boundaries)  # Offsets into ``accepted``, the bytes the decoder has got furthest with.
    accepted = data
    stray: tuple[int, int] | None = None
    for _ in range(MAX_STRICT_DECODES):
        candidate, guessed = accepted, None
        if stray is not None:
            count, marker = stray
            guessed = next((offset for offset, code in pending if code == marker), None)
            if guessed is None:
                break
            candidate = jpeg_structure.without_bytes_before(accepted, guessed, count)
        try:
            return cast(np.ndarray, simplejpeg.decode_jpeg(candidate, strict=True, **options))
        except ValueError as warning:
            if guessed is not None and _PREMATURE_END in str(warning):
                # The guess cut the scan's own data: the next boundary with that marker is tried.
                pending = [(offset, code) for offset, code in pending if offset > guessed]
                continue
            found = _EXTRANEOUS.search(str(warning))
            if found is None:
                raise
            if stray is not None and guessed is not None:
                # The decoder got past the dropped bytes, or skipped fewer before the same marker (it reads a few
                # bytes ahead, so it reports only some of them): the boundary stays a candidate.
                accepted = candidate
                pending = [(offset - stray[0], code) for offset, code in pending if offset >= guessed]
            stray = (int(found[1]), int(found[2], 16))
    raise InvalidImageError(RejectionReason.CORRUPT, "the JPEG could not be decoded")


def _to_grayscale(image: Image.Image) -> Image.Image:
    """Reduce any Pillow mode to 8-bit luminance, stretching high bit depths to the full 0-255 range.

    An 8-bit gray image is returned as it is; any other is converted ``STRIP_ROWS`` rows at a time, so no
    intermediate mode (RGBA, float64) ever exists at full size. Every step is per pixel (the stretch uses the
    whole image's extremes), so the pixels equal those of converting the whole image at once."""
    if image.mode == "L":
        return image
    convert: Callable[[Image.Image], Image.Image] = _strip_to_grayscale
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        low, high = (float(value) for value in cast(tuple[float, float], image.getextrema()))
        scale = 255.0 / (high - low) if high > low else 0.0

        def stretch(strip: Image.Image) -> Image.Image:
            values = np.asarray(strip, dtype=np.float64)
            return Image.fromarray(np.round((values - low) * scale).astype(np.uint8), mode="L")

        convert = stretch
    gray = Image.new("L", image.size)
    for top in range(0, image.height, decode_budget.STRIP_ROWS):
        bottom = min(top + decode_budget.STRIP_ROWS, image.height)
        gray.paste(convert(image.crop((0, top, image.width, bottom))), (0, top))
    return gray


def _strip_to_grayscale(image: Image.Image) -> Image.Image:
    """Reduce a strip of any 8-bit mode to luminance."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        # Transparent areas become black, like the unexposed border of a film.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode == "CMYK":
        image = image.convert("RGB")
    return image.convert("L")
