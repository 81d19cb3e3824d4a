"""DICOM files whose decoding cost is far out of proportion to their size, for the hostile corpus and the bench.

Each is built in well under a second from a real film (or from nothing): the soak builds its corpus every run.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

LIMIT_SIDE = 5_000
"""The side of a square film at the pixel limit (25 megapixels)."""
_UID = UID("1.2.826.0.1.3680043.8.498.1313")


def _dataset(rows: int, columns: int, *, bits: int, syntax: UID, frames: int = 1) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = _UID
    meta.TransferSyntaxUID = syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = _UID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = rows, columns
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.PixelRepresentation = 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    return dataset


def _saved(dataset: Dataset) -> bytes:
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


def jpeg_film_at_pixel_limit(film: Image.Image, *, frames: int = 1, quality: int = 75) -> bytes:
    """The film upscaled to 5,000 x 5,000 (exactly the pixel limit) as baseline JPEG, its one frame repeated
    ``frames`` times: a valid file whose naive decode held gigabytes."""
    large = film.convert("L").resize((LIMIT_SIDE, LIMIT_SIDE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    large.save(buffer, format="JPEG", quality=quality)
    dataset = _dataset(LIMIT_SIDE, LIMIT_SIDE, bits=8, syntax=JPEGBaseline8Bit, frames=frames)
    dataset.PixelData = encapsulate([buffer.getvalue()] * frames)
    dataset["PixelData"].is_undefined_length = True
    return _saved(dataset)


def header_element_bomb(film: Image.Image, elements: int) -> bytes:
    """A valid 256 px film with ``elements`` empty private elements before its pixel data: 8 bytes each in the
    file, hundreds each once parsed."""
    small = np.asarray(film.convert("L").resize((256, 256)))
    dataset = _dataset(256, 256, bits=8, syntax=ExplicitVRLittleEndian)
    dataset.PixelData = small.tobytes()
    return with_private_elements(_saved(dataset), elements)


def with_private_elements(data: bytes, elements: int) -> bytes:
    """An uncompressed Explicit VR Little Endian file with ``elements`` empty private elements of distinct tags
    (odd groups from 0029, explicit VR LO) inserted before its Pixel Data element."""
    pixel_element = max(data.rfind(b"\xe0\x7f\x10\x00OB"), data.rfind(b"\xe0\x7f\x10\x00OW"))
    per_group = 4096
    if 0x0029 + 2 * -(-elements // per_group) > 0x7FE0:
        raise ValueError("too many elements for the odd groups between the image module and the pixel data")
    tags = np.zeros(elements, dtype=[("group", "<u2"), ("element", "<u2"), ("vr", "S2"), ("length", "<u2")])
    index = np.arange(elements)
    tags["group"] = 0x0029 + 2 * (index // per_group)
    tags["element"] = 0x1000 + index % per_group
    tags["vr"] = b"LO"
    return data[:pixel_element] + tags.tobytes() + data[pixel_element:]


def deep_pixel_bomb() -> bytes:
    """A 5,000 x 5,000 film of 32-bit pixels in RLE Lossless (1.6 MB): 100 MB once decoded, more when converted."""
    pixels = LIMIT_SIDE * LIMIT_SIDE
    runs, rest = divmod(pixels, 128)
    # One PackBits segment per byte plane: runs of 128 copies (control byte -127), then the rest.
    segment = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest else b"")
    segment += b"\x00" * (len(segment) % 2)
    header = np.zeros(16, dtype="<u4")
    header[0] = 4
    header[1:5] = 64 + np.arange(4) * len(segment)
    dataset = _dataset(LIMIT_SIDE, LIMIT_SIDE, bits=32, syntax=RLELossless)
    dataset.PixelData = encapsulate([header.tobytes() + segment * 4])
    dataset["PixelData"].is_undefined_length = True
    return _saved(dataset)


def deflate_bomb(frames: int = 8) -> bytes:
    """A Deflated Explicit VR Little Endian file of 5,000 x 5,000 8-bit frames of zeros: a few hundred kilobytes
    that inflate to ``frames`` x 25 MB before any pixel is decoded."""
    dataset = _dataset(LIMIT_SIDE, LIMIT_SIDE, bits=8, syntax=ExplicitVRLittleEndian, frames=frames)
    dataset.PixelData = b""
    plain = _saved(dataset)
    # The body as pydicom writes it uncompressed, its empty Pixel Data element (the last 12 bytes) replaced by one
    # that holds the frames; deflated here chunk by chunk rather than by pydicom, which needs them all in memory.
    pixel_bytes = LIMIT_SIDE * LIMIT_SIDE * frames
    body = plain[_meta_end(plain) : -12] + b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_bytes.to_bytes(4, "little")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(2**22)
    deflated = [compressor.compress(body)]
    deflated += [compressor.compress(chunk) for _ in range(pixel_bytes // len(chunk))]
    deflated += [compressor.compress(bytes(pixel_bytes % len(chunk))), compressor.flush()]
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, dataset.file_meta)
    return bytes(128) + b"DICM" + meta.getvalue() + b"".join(deflated)


def _meta_end(data: bytes) -> int:
    """Where the file meta group of a file with a preamble ends (its group length element says)."""
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL: tag, VR, 2-byte length, value.
    return 144 + group_length
