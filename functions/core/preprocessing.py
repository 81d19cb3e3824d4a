"""The one preprocessing function shared by training and serving.

Training imports this module, so the pixels the model learns from and the pixels it is served can never drift
apart. It turns the bytes of an uploaded file into the model's input: decode, apply the EXIF orientation,
reduce to one grayscale channel, and resize to a square of ``INPUT_SIZE`` pixels. Intensity normalisation
happens inside the model, so the returned array stays plain ``uint8``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageOps

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


def preprocess(data: bytes, size: int = INPUT_SIZE) -> ModelInput:
    """Turn the bytes of a JPEG, PNG or DICOM file into the model's ``(size, size, 1)`` uint8 input."""
    return resize_for_model(decode(data, size), size)


def decode(data: bytes, size: int = INPUT_SIZE) -> DecodedImage:
    """Detect, validate and decode a file to grayscale; ``size`` lets large JPEGs decode at a reduced scale."""
    image_format = detect_format(data)
    if image_format is ImageFormat.DICOM:
        # pydicom is imported only when a DICOM file arrives, so JPEG and PNG scoring never pay for it.
        from core.dicom import decode_dicom  # noqa: PLC0415

        grayscale = decode_dicom(data)
        width, height = grayscale.size
    else:
        grayscale, (width, height) = _decode_with_pillow(data, image_format, size)
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(RejectionReason.TOO_SMALL, f"the shorter side is below {MIN_SIDE} px")
    return DecodedImage(grayscale, image_format, width, height)


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
    )


def _decode_with_pillow(data: bytes, image_format: ImageFormat, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode with Pillow hardened against bombs: an 8-bit grayscale image in display orientation, and the
    file's full pixel size (draft mode may decode a large JPEG at a reduced scale).

    Every rejection has a fixed text: Pillow's messages and warnings may quote what the file holds."""
    too_many = InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, f"more than {MAX_PIXELS:,} pixels")
    undecodable = InvalidImageError(RejectionReason.CORRUPT, f"the {image_format.value} could not be decoded")
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
            if image_format is ImageFormat.JPEG and image.mode in {"L", "RGB", "YCbCr"}:
                # Draft mode lets libjpeg decode a large film at 1/2, 1/4 or 1/8 scale, never below the target.
                image.draft("L", (size, size))
            full_size = image.size
            image.load()
            oriented = ImageOps.exif_transpose(image)
            grayscale = _to_grayscale(oriented)
        except InvalidImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise too_many from None
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001  # Pillow's plugins raise many types for malformed input; all are corrupt.
            raise undecodable from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
    return grayscale, full_size


def _to_grayscale(image: Image.Image) -> Image.Image:
    """Reduce any Pillow mode to 8-bit luminance, stretching high bit depths to the full 0-255 range."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(np.round((values - low) * scale).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        # Transparent areas become black, like the unexposed border of a film.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode == "CMYK":
        image = image.convert("RGB")
    return image.convert("L")
