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
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

LIMIT_SIDE = 5_000
"""The side of a square film at the pixel limit (25 megapixels)."""
_UID = UID("1.2.826.0.1.3680043.8.498.1313")


STATED_SIDE = 512
"""The side a codestream bomb's data set states."""


def _dataset(rows: int, columns: int, *, bits: int, syntax: UID, frames: int = 1, samples: int = 1) -> Dataset:
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
    dataset.SamplesPerPixel = samples
    dataset.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        dataset.PlanarConfiguration = 0
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


def _encapsulated(frame: bytes, rows: int, columns: int, *, syntax: UID, samples: int = 1) -> bytes:
    """A one-frame 8-bit DICOM file whose data set states ``rows`` x ``columns`` and whose frame is ``frame``."""
    dataset = _dataset(rows, columns, bits=8, syntax=syntax, samples=samples)
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].is_undefined_length = True
    return _saved(dataset)


CODESTREAM_SYNTAXES = {"JPEG": JPEGBaseline8Bit, "JPEG-LS": JPEGLSLossless, "JPEG 2000": JPEG2000Lossless}


def codestream_larger_than_header(syntax: str, side: int, *, samples: int = 1) -> bytes:
    """A DICOM file whose data set states a ``STATED_SIDE`` x ``STATED_SIDE`` film while its one frame is a
    ``syntax`` codestream (a key of ``CODESTREAM_SYNTAXES``) of a black ``side`` x ``side`` image: kilobytes that
    its decoder decodes at the codestream's own size. The black image is numpy's zeros, which take no memory."""
    # imagecodecs (the dev extra's encoders) is imported here: the demo's environment builds the corpus without it.
    import imagecodecs  # noqa: PLC0415

    black = np.zeros((side, side, samples) if samples > 1 else (side, side), dtype=np.uint8)
    if syntax == "JPEG":
        frame = imagecodecs.jpeg8_encode(black, level=90)
    elif syntax == "JPEG-LS":
        frame = imagecodecs.jpegls_encode(black)
    else:
        frame = imagecodecs.jpeg2k_encode(black, level=0, codecformat="j2k", reversible=True, numthreads=1)
    stated = STATED_SIDE
    return _encapsulated(bytes(frame), stated, stated, syntax=CODESTREAM_SYNTAXES[syntax], samples=samples)


def repeated_scan_frame(progressive_jpeg: bytes) -> bytes:
    """A baseline-JPEG DICOM file whose one frame is ``progressive_jpeg`` (infra.corpus.many_scans_jpeg: one scan
    repeated a thousand times) and whose data set states its size truly: only the scans are hostile."""
    width, height = Image.open(io.BytesIO(progressive_jpeg)).size
    return _encapsulated(progressive_jpeg, height, width, syntax=JPEGBaseline8Bit)


def rle_segment_bomb(side: int = STATED_SIDE, expansion: int = 64) -> bytes:
    """An RLE DICOM file stating a ``side`` x ``side`` 8-bit film whose one segment decodes to ``expansion`` times
    that: runs of 128 zeros (two bytes each), all decoded before pydicom compares the length."""
    segment = b"\x81\x00" * (side * side * expansion // 128)
    header = np.zeros(16, dtype="<u4")
    header[0], header[1] = 1, 64
    return _encapsulated(header.tobytes() + segment, side, side, syntax=RLELossless)
