"""One real film in every DICOM transfer syntax the scorer supports, for tests/test_dicom_syntaxes.py.

The film is samples/PNEUMONIA/person100_bacteria_475.jpeg (a 224 px test-split X-ray) upscaled to 512 x 480 pixels
and stretched to 12 bits: the size and depth of a small clinical film. The uncompressed syntaxes (and RLE, which
pydicom encodes itself) are built at test time from ``reference_film()``; the syntaxes that need an external
encoder are committed as files under tests/fixtures/dicom/, written once by running this module:

    .venv/bin/python -m tests.dicom_fixtures

Its encoders (imagecodecs: libjpeg-turbo 3 for 12-bit and lossless JPEG, CharLS for JPEG-LS, OpenJPEG for
JPEG 2000 and OpenJPH for HTJ2K) are in the ``dev`` extra only, never in the function's zip, and the tests do not
import them: the committed bytes stay the same whatever encoder version a machine has.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dicom"
ROWS, COLUMNS, BITS_STORED = 480, 512, 12
# Fixed UIDs, so that regenerating the files changes no byte that the encoders do not.
SOP_INSTANCE_UID = "1.2.826.0.1.3680043.8.498.13013013013013"


def reference_film() -> np.ndarray:
    """The 12-bit film: the sample X-ray upscaled (bicubic, in floating point) to 512 x 480, stretched to 0-4095."""
    gray = Image.open(SOURCE).convert("L").convert("F")
    upscaled = np.asarray(gray.resize((COLUMNS, ROWS), Image.Resampling.BICUBIC), dtype=np.float64)
    return np.clip(np.round(upscaled * (4095 / 255)), 0, 4095).astype(np.uint16)


def film_dataset(pixels: np.ndarray, *, bits_stored: int = BITS_STORED, monochrome1: bool = False) -> Dataset:
    """A single-frame grayscale CR data set of ``pixels`` (uint8 or uint16), uncompressed (Explicit VR LE)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = SOP_INSTANCE_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = SOP_INSTANCE_UID
    dataset.Modality = "CR"
    dataset.BodyPartExamined = "CHEST"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.PixelRepresentation = 0
    allocated = 8 if pixels.dtype == np.uint8 else 16
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = allocated, bits_stored, bits_stored - 1
    dataset.PixelData = pixels.tobytes()
    return dataset


def saved(dataset: Dataset, **options: bool) -> bytes:
    """The data set as a DICOM file (with preamble and file meta)."""
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True, **options)
    return output.getvalue()


def film_in_syntax(syntax: UID, *, monochrome1: bool = False) -> bytes:
    """The reference film as a DICOM file in an uncompressed syntax or RLE Lossless, which pydicom writes itself;
    MONOCHROME1 stores the inverted pixels, which a viewer shows as the same film."""
    film = reference_film()
    pixels = 4095 - film if monochrome1 else film
    dataset = film_dataset(pixels, monochrome1=monochrome1)
    if syntax == RLELossless:
        dataset.compress(RLELossless)
        return saved(dataset)
    dataset.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        # pydicom writes Pixel Data's bytes as they are: big-endian words must be given as such.
        dataset.PixelData = pixels.astype(">u2").tobytes()
    return saved(dataset)


@dataclass(frozen=True)
class Fixture:
    """One committed file: its transfer syntax, the bit depth stored, and how its one frame is encoded."""

    name: str
    syntax: UID
    bits_stored: int
    encode: Callable[[np.ndarray], bytes]


def _fixtures() -> list[Fixture]:
    # imagecodecs is a dev-only encoder: imported here so that the tests, which read the files, never need it.
    import imagecodecs  # noqa: PLC0415

    return [
        Fixture("jpeg-baseline.dcm", JPEGBaseline8Bit, 8, lambda p: imagecodecs.jpeg8_encode(p, level=95)),
        Fixture(
            "jpeg-extended-12bit.dcm",
            JPEGExtended12Bit,
            12,
            lambda p: imagecodecs.jpeg8_encode(p, level=95, bitspersample=12),
        ),
        Fixture(
            "jpeg-lossless-p14.dcm",
            JPEGLossless,
            12,
            lambda p: imagecodecs.jpeg8_encode(p, lossless=True, predictor=7, bitspersample=12),
        ),
        Fixture(
            "jpeg-lossless-sv1.dcm",
            JPEGLosslessSV1,
            12,
            lambda p: imagecodecs.jpeg8_encode(p, lossless=True, predictor=1, bitspersample=12),
        ),
        Fixture("jpeg-ls-lossless.dcm", JPEGLSLossless, 12, lambda p: imagecodecs.jpegls_encode(p, level=0)),
        Fixture("jpeg-ls-near-lossless.dcm", JPEGLSNearLossless, 12, lambda p: imagecodecs.jpegls_encode(p, level=3)),
        Fixture(
            "jpeg2000-lossless.dcm",
            JPEG2000Lossless,
            12,
            lambda p: imagecodecs.jpeg2k_encode(p, codecformat="J2K", reversible=True, bitspersample=12),
        ),
        Fixture(
            "jpeg2000-lossy.dcm",
            JPEG2000,
            12,
            lambda p: imagecodecs.jpeg2k_encode(p, level=55, codecformat="J2K", reversible=False, bitspersample=12),
        ),
        Fixture("htj2k-lossless.dcm", HTJ2KLossless, 12, lambda p: imagecodecs.htj2k_encode(p, reversible=True)),
    ]


def fixture_pixels(bits_stored: int) -> np.ndarray:
    """The film at the depth a fixture stores: 12 bits, or 8 bits (the top bits) for baseline JPEG."""
    film = reference_film()
    return (film >> 4).astype(np.uint8) if bits_stored == 8 else film


def main() -> None:
    """Write every committed fixture and print its size."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for fixture in _fixtures():
        pixels = fixture_pixels(fixture.bits_stored)
        dataset = film_dataset(pixels, bits_stored=fixture.bits_stored)
        dataset.file_meta.TransferSyntaxUID = fixture.syntax
        dataset.PixelData = encapsulate([fixture.encode(pixels)])
        dataset["PixelData"].is_undefined_length = True
        if fixture.syntax in {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000}:
            dataset.LossyImageCompression = "01"
        path = FIXTURES / fixture.name
        path.write_bytes(saved(dataset))
        print(f"{fixture.name}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
