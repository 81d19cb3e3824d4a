"""DICOM decoding with pydicom, to 8-bit grayscale: uncompressed, RLE and JPEG 2000 natively (JPEG 2000 through
Pillow), and with pylibjpeg-libjpeg the JPEG syntaxes of clinical archives: baseline, Extended (12-bit), Lossless
(process 14, SV1 included) and JPEG-LS. A syntax no installed decoder handles is ``UNSUPPORTED_FORMAT`` naming it,
never a corrupt file. Files without the 128-byte preamble (starting ``DICM``) are read too.

A DICOM file carries patient data in its elements (names, IDs, dates). Nothing read from the file reaches an
error, a warning or a log line: every rejection has a fixed text chosen here, and pydicom's own warnings and log
records, which quote element values, are silenced while a file is decoded.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, AllTransferSyntaxes

from core.rejections import MAX_PIXELS, InvalidImageError, RejectionReason

UNREADABLE_HEADER = "the DICOM header could not be read"
UNREADABLE_PIXELS = "the DICOM pixel data could not be decoded"
TOO_MANY_PIXELS = f"the DICOM image has more than {MAX_PIXELS:,} pixels"
UNKNOWN_SYNTAX = "the DICOM transfer syntax is not a recognised one"
PREAMBLE_BYTES = 128


def decode_dicom(data: bytes) -> Image.Image:
    """The first frame of a DICOM file as 8-bit grayscale, windowed by its VOI LUT and shown MONOCHROME2-style."""
    with _silenced_pydicom():
        dataset = _read_header(data)
        pixels = _read_pixels(dataset)
        try:
            return _to_grayscale(dataset, pixels)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001  # Malformed LUT or window elements raise many types; all are corrupt.
            raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_PIXELS) from None


def transfer_syntax_name(dataset: Dataset) -> str | None:
    """The standard name of the file's transfer syntax when pydicom knows it: never the UID as the file spells it,
    which may be anything."""
    uid = str(dataset.get("file_meta", Dataset()).get("TransferSyntaxUID", ""))
    return next((syntax.name for syntax in AllTransferSyntaxes if syntax == uid), None)


@contextmanager
def _silenced_pydicom() -> Iterator[None]:
    """pydicom warns and logs about malformed elements quoting their values (patient names, IDs): while a file is
    decoded neither reaches stderr or the logs (Lambda sends both to CloudWatch)."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled = pydicom_logger.disabled
    pydicom_logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled = was_disabled


def _read_header(data: bytes) -> Dataset:
    # `from None` throughout: the chained exception's message quotes element values.
    if data.startswith(b"DICM"):
        data = bytes(PREAMBLE_BYTES) + data  # The preamble is optional in practice; pydicom expects one.
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # pydicom raises many types for a malformed header; each is a corrupt file.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_HEADER) from None
    if rows * columns > MAX_PIXELS:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, TOO_MANY_PIXELS)
    return dataset


def _read_pixels(dataset: Dataset) -> np.ndarray:
    if not _decodable(dataset):
        name = transfer_syntax_name(dataset)
        detail = f"DICOM transfer syntax {name} cannot be decoded" if name else UNKNOWN_SYNTAX
        raise InvalidImageError(RejectionReason.UNSUPPORTED_FORMAT, detail)
    try:
        pixels: np.ndarray = dataset.pixel_array
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # pydicom raises many types for missing or truncated pixel data.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_PIXELS) from None
    return pixels


def _decodable(dataset: Dataset) -> bool:
    """Whether an installed decoder handles the file's transfer syntax (pydicom raises RuntimeError, like a
    corrupt file, when the decoder's plugins are missing; that is checked here first). A file without a transfer
    syntax is left to pydicom."""
    uid = dataset.get("file_meta", Dataset()).get("TransferSyntaxUID")
    if uid is None:
        return True
    try:
        return bool(get_decoder(UID(str(uid))).is_available)
    except NotImplementedError:
        return False


def _to_grayscale(dataset: Dataset, pixels: np.ndarray) -> Image.Image:
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
