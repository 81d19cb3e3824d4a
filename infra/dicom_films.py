"""12-bit DICOM files made from real 8-bit films, as modalities write them: the film's gray levels mapped linearly
onto part of the 0-4095 range (some with a rescale slope and intercept, one stored MONOCHROME1), with or without a
window, with or without one full-scale burned-in marker in a corner. ``bench/bench_dicom_display.py`` measures
how the served model's labels hold up on them and ``tests/test_dicom_display.py`` checks a few films. And any DICOM
file with a stated patient age, for the validated-population tests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

PATIENT_AGE = Tag(0x0010, 0x1010)
FULL_SCALE = 4095
"""The largest 12-bit stored value: what a burned-in marker is written with."""
MARKER_SIDE = 0.08
"""The marker's side as a share of the film's shorter side (0.64% of its pixels): a lead letter's box."""


@dataclass(frozen=True)
class FilmEncoding:
    """How a film's 8-bit gray level ``v`` becomes a stored 12-bit value: ``scale * v + offset`` (stored inverted,
    ``4095 - that``, for MONOCHROME1), and the rescale the file declares."""

    name: str
    scale: int
    offset: int
    rescale: tuple[float, float] | None = None
    """(RescaleSlope, RescaleIntercept); None for none."""
    monochrome1: bool = False

    def stored(self, film: np.ndarray) -> np.ndarray:
        """The stored values of an 8-bit film."""
        values = self.scale * film.astype(np.int32) + self.offset
        if self.monochrome1:
            values = FULL_SCALE - values
        return values.astype(np.uint16)

    def window(self) -> tuple[float, float]:
        """A LINEAR window (centre, width) in modality values that shows gray levels 0 to 255 as black to white."""
        slope, intercept = self.rescale or (1.0, 0.0)
        # The window is on modality values; MONOCHROME1's are inverted, but a window's range is the same either way.
        ends = [self.offset, self.offset + 255 * self.scale]
        if self.monochrome1:
            ends = [FULL_SCALE - end for end in ends]
        low, high = sorted(slope * end + intercept for end in ends)
        width = high - low + 1
        return low + 0.5 + (width - 1) / 2, width


FILM_ENCODINGS = (
    FilmEncoding("mid-range", scale=12, offset=600),
    FilmEncoding("narrow", scale=4, offset=200),
    FilmEncoding("rescaled", scale=14, offset=100, rescale=(0.5, -1024.0)),
    FilmEncoding("monochrome1", scale=10, offset=900, monochrome1=True),
)
"""The encodings films are cycled through: none fills the 12-bit range, so a full-scale marker lies beyond the film."""


def burn_marker(stored: np.ndarray, side: float = MARKER_SIDE) -> np.ndarray:
    """The stored values with a full-scale square burned into the top right corner, as a lead marker's box."""
    marked = stored.copy()
    rows, columns = marked.shape
    size = max(1, round(side * min(rows, columns)))
    top, right = rows // 20, columns - columns // 20
    marked[top : top + size, right - size : right] = FULL_SCALE
    return marked


def film_dicom(film: np.ndarray, encoding: FilmEncoding, *, window: bool, marker: bool) -> bytes:
    """A single-frame 12-bit DICOM file of an 8-bit film (``(rows, columns)`` uint8)."""
    stored = encoding.stored(film)
    if marker:
        stored = burn_marker(stored)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.BodyPartExamined = "CHEST"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1" if encoding.monochrome1 else "MONOCHROME2"
    dataset.PixelRepresentation = 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    if encoding.rescale is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = (f"{value:g}" for value in encoding.rescale)
    if window:
        center, width = encoding.window()
        dataset.WindowCenter, dataset.WindowWidth = f"{center:g}", f"{width:g}"
    dataset.PixelData = stored.tobytes()
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


def with_patient_age(data: bytes, age: str | None) -> bytes:
    """A DICOM file with its ``PatientAge`` set to ``age`` exactly as written (padded to an even length, as DICOM
    values are, and unchecked: a sender may write a plain number or anything), or without one for None."""
    dataset = dcmread(io.BytesIO(data))
    if PATIENT_AGE in dataset:
        del dataset[PATIENT_AGE]
    if age is not None:
        raw = age.encode().ljust(len(age) + len(age) % 2)
        dataset[PATIENT_AGE] = RawDataElement(PATIENT_AGE, "AS", len(raw), raw, 0, False, True)
    output = io.BytesIO()
    dataset.save_as(output)
    return output.getvalue()
