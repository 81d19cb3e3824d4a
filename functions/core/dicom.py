"""DICOM decoding with pydicom, to 8-bit grayscale: uncompressed, RLE and JPEG 2000 natively (JPEG 2000 through
Pillow), and with pylibjpeg-libjpeg the JPEG syntaxes of clinical archives: baseline, Extended (12-bit), Lossless
(process 14, SV1 included) and JPEG-LS. A syntax no installed decoder handles is ``UNSUPPORTED_FORMAT`` naming it,
never a corrupt file. Files without the 128-byte preamble (starting ``DICM``) are read too.

Decoding cost is bounded before anything is decoded: the file's structure (elements, inflated size) by
``core.dicom_structure``; the pixels by ``MAX_DECODED_BYTES``, counted for the one frame that is decoded (the
first: a chest radiograph is one frame, and the others of a multi-frame file are never touched) with the
conversion's own arrays; and the conversion to 8 bits works in stripes, so no float copy of the whole image exists.

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

from core.dicom_structure import check_structure
from core.rejections import MAX_DECODED_BYTES, MAX_PIXELS, InvalidImageError, RejectionReason

UNREADABLE_HEADER = "the DICOM header could not be read"
UNREADABLE_PIXELS = "the DICOM pixel data could not be decoded"
TOO_MANY_PIXELS = f"the DICOM image has more than {MAX_PIXELS:,} pixels"
UNKNOWN_SYNTAX = "the DICOM transfer syntax is not a recognised one"
OVER_BUDGET = f"the DICOM frame and its conversion need more than {MAX_DECODED_BYTES:,} bytes"
PREAMBLE_BYTES = 128
STRIPE_PIXELS = 1 << 18
"""Pixels converted at a time: the float64 arrays of the windowing are a few megabytes, whatever the image."""
_STRIPE_BYTES = 4 * 8 * STRIPE_PIXELS
"""What the conversion of one stripe holds at most: four float64 arrays of its pixels."""


def decode_dicom(data: bytes) -> Image.Image:
    """The first frame of a DICOM file as 8-bit grayscale, windowed by its VOI LUT and shown MONOCHROME2-style."""
    with _silenced_pydicom():
        dataset = _read_header(data)
        _check_budget(dataset)
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
    uid = _transfer_syntax_uid(dataset)
    return next((syntax.name for syntax in AllTransferSyntaxes if syntax == uid), None)


def _transfer_syntax_uid(dataset: Dataset) -> str | None:
    """The transfer syntax UID of the file meta, as the file spells it; None without one."""
    uid = dataset.get("file_meta", Dataset()).get("TransferSyntaxUID")
    return None if uid is None else str(uid)


@contextmanager
def _silenced_pydicom() -> Iterator[None]:
    """pydicom warns and logs about malformed elements quoting their values (patient names, IDs): while a file is
    decoded neither reaches stderr or the logs (Lambda sends both to CloudWatch)."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled, propagated = pydicom_logger.disabled, pydicom_logger.propagate
    # Disabling the logger silences its own records; its children's (pydicom.pixels.decoders.base logs a failed
    # decode with its traceback) still reach the root's handlers unless the parent stops propagating them.
    pydicom_logger.disabled, pydicom_logger.propagate = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled, pydicom_logger.propagate = was_disabled, propagated


def _read_header(data: bytes) -> Dataset:
    # `from None` throughout: the chained exception's message quotes element values.
    if data.startswith(b"DICM"):
        data = bytes(PREAMBLE_BYTES) + data  # The preamble is optional in practice; pydicom expects one.
    check_structure(data)  # Elements and inflated size, counted before pydicom holds any of them.
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


def _check_budget(dataset: Dataset) -> None:
    """Reject a file whose first frame, decoded, and the conversion's arrays would exceed ``MAX_DECODED_BYTES``:
    the frame (rows x columns x samples x whole bytes per sample), one byte per pixel of output (and per sample of
    a colour frame's 8-bit copy) and one stripe's float arrays. Other frames are not decoded and not counted."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        samples = int(dataset.get("SamplesPerPixel", 1))
        bits = int(dataset.BitsAllocated)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001  # A missing or malformed element raises many types; each is a corrupt file.
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_HEADER) from None
    if rows < 1 or columns < 1 or samples < 1 or bits < 1:
        raise InvalidImageError(RejectionReason.CORRUPT, UNREADABLE_HEADER)
    frame = rows * columns * samples * -(-bits // 8)
    output = rows * columns * (samples + 1 if samples > 1 else 1)
    if frame + output + _STRIPE_BYTES > MAX_DECODED_BYTES:
        raise InvalidImageError(RejectionReason.DECOMPRESSION_BOMB, OVER_BUDGET)


def _read_pixels(dataset: Dataset) -> np.ndarray:
    if not _decodable(dataset):
        name = transfer_syntax_name(dataset)
        detail = f"DICOM transfer syntax {name} cannot be decoded" if name else UNKNOWN_SYNTAX
        raise InvalidImageError(RejectionReason.UNSUPPORTED_FORMAT, detail)
    try:
        dataset.pixel_array_options(index=0)  # The first frame only: the others are never decoded.
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
    uid = _transfer_syntax_uid(dataset)
    if uid is None:
        return True
    try:
        return bool(get_decoder(UID(uid)).is_available)
    except NotImplementedError:
        return False


def _to_grayscale(dataset: Dataset, pixels: np.ndarray) -> Image.Image:
    """The frame as 8-bit grayscale: colour through Pillow's luminance; monochrome through the modality and VOI
    LUTs, stretched to 0-255 (MONOCHROME1 inverted). Both LUTs act on each pixel alone, so they are applied a
    stripe of rows at a time, twice (the range first, then the output): the result is the whole-image float64
    computation's, bit for bit, with a few megabytes of floats instead of several copies of the image."""
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:
        return Image.fromarray(pixels.astype(np.uint8)).convert("L")
    rows = max(1, STRIPE_PIXELS // max(1, pixels.shape[1]))
    stripes = [slice(start, start + rows) for start in range(0, pixels.shape[0], rows)]
    low, high = np.inf, -np.inf
    for stripe in stripes:
        values = _windowed(dataset, pixels[stripe])
        # np.minimum and np.maximum carry a NaN through, as the whole image's min() and max() did.
        low, high = float(np.minimum(low, values.min())), float(np.maximum(high, values.max()))
    output = np.zeros(pixels.shape, dtype=np.uint8)
    if high > low:
        for stripe in stripes:
            scaled = (_windowed(dataset, pixels[stripe]) - low) * (255.0 / (high - low))
            if photometric == "MONOCHROME1":
                scaled = 255.0 - scaled  # MONOCHROME1 shows the lowest value as white.
            output[stripe] = np.round(scaled)
    elif photometric == "MONOCHROME1":
        output[:] = 255  # A constant image: zeros, inverted.
    return Image.fromarray(output, mode="L")


def _windowed(dataset: Dataset, pixels: np.ndarray) -> np.ndarray:
    values: np.ndarray = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset).astype(np.float64)
    return values
