"""One real 12-bit film in every DICOM transfer syntax the scorer supports scores like the uncompressed film.

The film and the committed files are described in tests/dicom_fixtures.py. Tolerances on the release model's
pneumonia probability, against the uncompressed Explicit VR Little Endian film (0.934, PNEUMONIA; threshold 0.824),
as measured with the robust window of a file without a VOI window (``core.dicom``): every lossless syntax gives the
reference's pixels exactly, so the same probability; MONOCHROME1, stored inverted, is displayed like the reference
(0.0000 measured, 0.01 allowed); the lossy syntaxes differ by 0.0006 (baseline JPEG, 8 bits), 0.0040 (JPEG
Extended, 12 bits), 0.0081 (JPEG 2000 at 55 dB) and 0.0076 (JPEG-LS near-lossless, error 3 of 4,095): 0.05
allowed, the bar of the other encodings' test.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from core.preprocessing import ImageFormat, decode, preprocess
from core.rejections import InvalidImageError, RejectionReason
from scoring.classifier import Classifier
from tests.conftest import RELEASE_MODEL
from tests.dicom_fixtures import FIXTURES, film_in_syntax

LOSSLESS_TOLERANCE = 1e-6
MONOCHROME1_TOLERANCE = 0.01
LOSSY_TOLERANCE = 0.05

BUILT = {
    "implicit-vr-le": (ImplicitVRLittleEndian, LOSSLESS_TOLERANCE),
    "explicit-vr-be": (ExplicitVRBigEndian, LOSSLESS_TOLERANCE),
    "deflated-explicit-vr-le": (DeflatedExplicitVRLittleEndian, LOSSLESS_TOLERANCE),
    "rle-lossless": (RLELossless, LOSSLESS_TOLERANCE),
}
COMMITTED = {
    "jpeg-baseline": LOSSY_TOLERANCE,
    "jpeg-extended-12bit": LOSSY_TOLERANCE,
    "jpeg-lossless-p14": LOSSLESS_TOLERANCE,
    "jpeg-lossless-sv1": LOSSLESS_TOLERANCE,
    "jpeg-ls-lossless": LOSSLESS_TOLERANCE,
    "jpeg-ls-near-lossless": LOSSY_TOLERANCE,
    "jpeg2000-lossless": LOSSLESS_TOLERANCE,
    "jpeg2000-lossy": LOSSY_TOLERANCE,
}


@pytest.fixture(scope="module")
def release() -> Classifier:
    return Classifier.from_directory(RELEASE_MODEL)


@pytest.fixture(scope="module")
def reference(release: Classifier) -> tuple[str, float]:
    """The uncompressed film's label and pneumonia probability."""
    return _score(release, film_in_syntax(ExplicitVRLittleEndian))


def _score(classifier: Classifier, data: bytes) -> tuple[str, float]:
    model_input = preprocess(data, size=classifier.input_size)
    assert model_input.image_format is ImageFormat.DICOM
    prediction = classifier.predict(model_input.pixels[np.newaxis])[0]
    return prediction.label, prediction.pneumonia_probability


def _syntax_files() -> list[tuple[str, bytes, float]]:
    files = [(name, film_in_syntax(syntax), tolerance) for name, (syntax, tolerance) in BUILT.items()]
    files.append(("monochrome1", film_in_syntax(ExplicitVRLittleEndian, monochrome1=True), MONOCHROME1_TOLERANCE))
    files += [(name, (FIXTURES / f"{name}.dcm").read_bytes(), tolerance) for name, tolerance in COMMITTED.items()]
    return files


@pytest.mark.parametrize(("name", "data", "tolerance"), _syntax_files(), ids=lambda value: str(value)[:24])
def test_every_supported_syntax_scores_like_the_uncompressed_film(
    release: Classifier, reference: tuple[str, float], name: str, data: bytes, tolerance: float
) -> None:
    """The film in each supported transfer syntax (and as MONOCHROME1) gets the reference's label, and its
    pneumonia probability within the syntax's tolerance."""
    label, probability = _score(release, data)
    assert label == reference[0], name
    assert abs(probability - reference[1]) <= tolerance, name


@pytest.mark.parametrize("name", [name for name, tolerance in COMMITTED.items() if tolerance == LOSSLESS_TOLERANCE])
def test_lossless_syntaxes_decode_to_the_films_pixels(name: str) -> None:
    """Each lossless clinical syntax decodes to exactly the grayscale of the uncompressed film."""
    reference = np.asarray(decode(film_in_syntax(ExplicitVRLittleEndian)).grayscale)
    assert np.array_equal(np.asarray(decode((FIXTURES / f"{name}.dcm").read_bytes()).grayscale), reference)


def test_syntax_without_a_decoder_is_unsupported_and_named() -> None:
    """A real HTJ2K file (no decoder for it ships in the function) is UNSUPPORTED_FORMAT naming its syntax."""
    with pytest.raises(InvalidImageError) as raised:
        preprocess((FIXTURES / "htj2k-lossless.dcm").read_bytes())
    assert raised.value.reason is RejectionReason.UNSUPPORTED_FORMAT
    assert raised.value.detail == (
        "DICOM transfer syntax High-Throughput JPEG 2000 Image Compression (Lossless Only) cannot be decoded"
    )
    assert UID("1.2.840.10008.1.2.4.201").name in raised.value.detail
