"""DICOM decoding with pydicom: uncompressed and baseline-JPEG transfer syntaxes, to 8-bit grayscale."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from core.rejections import MAX_PIXELS, InvalidImageError, RejectionReason


def decode_dicom(data: bytes) -> Image.Image:
    """The first frame of a DICOM file as 8-bit grayscale, windowed by its VOI LUT and shown MONOCHROME2-style."""
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, OSError) as error:
        raise InvalidImageError(RejectionReason.CORRUPT, f"DICOM header could not be read: {error}") from error
    if rows * columns > MAX_PIXELS:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, f"{columns}x{rows} pixels exceeds {MAX_PIXELS}")
    try:
        pixels = dataset.pixel_array
    except NotImplementedError as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        raise InvalidImageError(RejectionReason.UNSUPPORTED_FORMAT, f"DICOM transfer syntax {syntax}") from error
    except (AttributeError, ValueError, TypeError, OSError, RuntimeError) as error:
        # pydicom raises several types for missing or truncated pixel data; each is a corrupt file.
        raise InvalidImageError(RejectionReason.CORRUPT, f"DICOM pixel data could not be decoded: {error}") from error
    if pixels.ndim == 4 or (pixels.ndim == 3 and int(dataset.get("NumberOfFrames", 1)) > 1):
        pixels = pixels[0]
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:
        return Image.fromarray(pixels.astype(np.uint8)).convert("L")
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 255.0 - scaled  # MONOCHROME1 shows the lowest value as white.
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
