"""Build real DICOM files in memory, uncompressed or with a baseline-JPEG transfer syntax."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def dicom_bytes(image: Image.Image, *, jpeg: bool = False, bits: int = 16, monochrome1: bool = False) -> bytes:
    """A single-frame grayscale DICOM of ``image``; 12 of 16 bits used, or 8-bit baseline JPEG."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = image.height, image.width
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.PixelRepresentation = 0
    gray = np.asarray(image.convert("L"))
    if monochrome1:
        gray = 255 - gray
    if jpeg:
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, format="JPEG", quality=95)
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
        dataset.PixelData = encapsulate([buffer.getvalue()])
        dataset["PixelData"].is_undefined_length = True
    else:
        stored = bits if bits <= 8 else 12
        values = gray.astype(np.uint16) * 16 if bits > 8 else gray
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, stored, stored - 1
        dataset.PixelData = values.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()
