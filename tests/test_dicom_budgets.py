"""DICOM decode budgets: elements, inflated size and decoded bytes are bounded before decoding; the conversion to
8 bits is the whole-image computation's, with a fraction of its memory."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from core import dicom
from core.dicom import OVER_BUDGET, decode_dicom
from core.dicom_structure import INFLATES_TOO_FAR, MAX_ELEMENTS, TOO_MANY_ELEMENTS
from core.preprocessing import preprocess
from core.rejections import MAX_DECODED_BYTES, InvalidImageError, RejectionReason
from infra.corpus import dicom_bytes
from infra.dicom_bombs import (
    deep_pixel_bomb,
    deflate_bomb,
    header_element_bomb,
    jpeg_film_at_pixel_limit,
    with_private_elements,
)
from tests.conftest import SAMPLES
from tests.dicom_fixtures import film_dataset, film_in_syntax, reference_film, saved

T = TypeVar("T")


def _rejection(data: bytes) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as raised:
        preprocess(data)
    return raised.value


def test_too_many_header_elements_is_a_bomb_and_pydicom_never_parses_them(
    sample_xray: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file with 400,000 empty header elements (3.2 MB; 150 MB and 3 s in pydicom) is DECOMPRESSION_BOMB with a
    fixed text, rejected before pydicom reads it; one with a few thousand is read."""
    assert preprocess(header_element_bomb(sample_xray, 5_000)).original_width == 256
    monkeypatch.setattr(dicom.pydicom, "dcmread", _never_called)
    rejection = _rejection(header_element_bomb(sample_xray, 400_000))
    assert rejection.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejection.detail == TOO_MANY_ELEMENTS == "the DICOM file has more than 20,000 elements"


def _never_called(*_: object, **__: object) -> None:
    raise AssertionError("pydicom parsed a file that the structure check should have rejected")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_elements_inside_sequences_and_fragments_are_counted(syntax: str) -> None:
    """Elements hidden in a sequence's items (explicit or implicit VR, defined or undefined lengths) and pixel
    data split into thousands of fragments count against the cap."""
    dataset = film_dataset(reference_film()[:128, :128])
    dataset.file_meta.TransferSyntaxUID = syntax
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    dataset.ReferencedImageSequence = [item] * (MAX_ELEMENTS // 2)
    assert _rejection(saved(dataset)).detail == TOO_MANY_ELEMENTS
    fragmented = film_dataset(reference_film()[:128, :128])
    fragmented.file_meta.TransferSyntaxUID = RLELossless
    fragmented.PixelData = encapsulate([b"\x00\x00"] * (MAX_ELEMENTS + 1))
    fragmented["PixelData"].is_undefined_length = True
    assert _rejection(saved(fragmented)).detail == TOO_MANY_ELEMENTS


def test_elements_in_a_defined_length_sequence_of_unknown_vr_are_counted() -> None:
    """A sequence stored as UN (implicit VR inside) or as an implicit-VR private element of defined length, the
    kind pydicom parses only when it is read, is walked into and counted."""
    dataset = film_dataset(reference_film()[:128, :128])
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    dataset.add_new(0x00291010, "SQ", [item] * (MAX_ELEMENTS // 2))
    data = saved(dataset)
    assert _rejection(data).detail == TOO_MANY_ELEMENTS
    explicit = dcmread(io.BytesIO(data))
    explicit.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    raw = saved(explicit)
    # pydicom reads the unknown private element as UN and writes it so: defined length, implicit VR items inside.
    assert raw.count(b"\x29\x00\x10\x10UN") == 1
    assert _rejection(raw).detail == TOO_MANY_ELEMENTS


def test_pixel_data_that_looks_like_items_is_not_counted() -> None:
    """Implicit-VR pixel data whose 16-bit values happen to spell item headers (0xFFFE, 0xE000, ...) is pixels,
    not a sequence: the file is read, not rejected for its 'elements'."""
    item = np.array([0xFFFE, 0xE000, 0, 0], dtype="<u2")
    dataset = film_dataset(np.tile(item, 300 * 300 // 4).reshape(300, 300))
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert preprocess(saved(dataset)).original_width == 300


def _with_peak_allocation(run: Callable[[], T]) -> tuple[T, int]:
    """What ``run`` returns, and the most memory Python and numpy held while it ran (tracemalloc's peak)."""
    tracemalloc.start()
    try:
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_deflate_bomb_is_rejected_without_inflating_it() -> None:
    """190 KB of deflated data set that inflates to 200 MB is DECOMPRESSION_BOMB; nothing near its size is held."""
    data = deflate_bomb()
    assert len(data) < 300_000
    rejection, peak = _with_peak_allocation(lambda: _rejection(data))
    assert rejection.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejection.detail == INFLATES_TOO_FAR
    assert peak < 20_000_000


def test_frame_over_the_decode_budget_is_a_bomb() -> None:
    """A 5,000 x 5,000 film of 32-bit pixels (1.5 MB of RLE; 100 MB decoded, gigabytes converted) is
    DECOMPRESSION_BOMB before it is decoded; a 4,300 x 4,300 16-bit film is within budget."""
    rejection = _rejection(deep_pixel_bomb())
    assert rejection.reason is RejectionReason.DECOMPRESSION_BOMB
    assert rejection.detail == OVER_BUDGET
    assert f"{MAX_DECODED_BYTES:,}" in OVER_BUDGET
    detector = film_dataset(np.zeros((4_300, 4_300), dtype=np.uint16))
    dicom._check_budget(detector)


def test_only_the_first_frame_is_decoded(sample_xray: Image.Image) -> None:
    """A multi-frame file is read from its first frame: frames after it are never decoded (here they are not
    even JPEG), and the file scores like its first frame alone."""
    single = dcmread(io.BytesIO(dicom_bytes(sample_xray, jpeg=True)))
    first = single.PixelData
    frames = dcmread(io.BytesIO(dicom_bytes(sample_xray, jpeg=True)))
    frames.NumberOfFrames = 12
    frames.PixelData = encapsulate([get_frame(first, 0)] + [b"not a JPEG frame"] * 11)
    frames["PixelData"].is_undefined_length = True
    multi = saved(frames)
    assert np.array_equal(preprocess(multi).pixels, preprocess(dicom_bytes(sample_xray, jpeg=True)).pixels)


def test_film_at_the_pixel_limit_decodes_within_budget(sample_xray: Image.Image) -> None:
    """A 5,000 x 5,000 JPEG DICOM with 12 frames (the issue's 960 MB, all frames decoded) decodes with at most
    the decode budget of memory that numpy and pydicom allocate."""
    data = jpeg_film_at_pixel_limit(sample_xray, frames=12, quality=30)
    decoded, peak = _with_peak_allocation(lambda: decode_dicom(data))
    assert decoded.grayscale.size == (5_000, 5_000)
    assert peak < MAX_DECODED_BYTES


def _whole_image_grayscale(dataset: Dataset, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """The conversion of the whole image in one stripe: float64 arrays of every pixel at once."""
    with monkeypatch.context() as whole:
        whole.setattr(dicom, "STRIPE_PIXELS", int(dataset.Rows) * int(dataset.Columns))
        return np.asarray(dicom._to_grayscale(dataset, dataset.pixel_array))


def _real_films() -> list[np.ndarray]:
    """The 12-bit reference film and the ten sample X-rays stretched to 12 bits."""
    samples = [np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 16 for path in sorted(SAMPLES.glob("*/*"))]
    return [reference_film(), *samples]


@pytest.mark.parametrize(
    "elements",
    [
        {},
        {"RescaleSlope": "0.37", "RescaleIntercept": "-1024.5", "WindowCenter": "600", "WindowWidth": "1500"},
        {"WindowCenter": "2000", "WindowWidth": "900", "VOILUTFunction": "SIGMOID"},
        {"PhotometricInterpretation": "MONOCHROME1", "WindowCenter": "1800", "WindowWidth": "2500"},
        {"PhotometricInterpretation": "MONOCHROME1", "RescaleSlope": "2", "RescaleIntercept": "-100"},
    ],
    ids=["plain", "rescale-and-window", "sigmoid", "monochrome1", "monochrome1-robust-window"],
)
def test_striped_conversion_is_the_whole_image_conversion(
    elements: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On real films, with rescale, linear and sigmoid windows, MONOCHROME1 and the robust window of a file without
    one, the striped conversion gives the whole-image float64 conversion's bytes exactly, with stripes of many rows
    or of a few."""
    for film in _real_films():
        dataset = film_dataset(film)
        for keyword, value in elements.items():
            setattr(dataset, keyword, value)
        dataset = dcmread(io.BytesIO(saved(dataset)))
        expected = _whole_image_grayscale(dataset, monkeypatch)
        for stripe_pixels in (dicom.STRIPE_PIXELS, 3 * film.shape[1] + 1):
            monkeypatch.setattr(dicom, "STRIPE_PIXELS", stripe_pixels)
            converted = np.asarray(dicom._to_grayscale(dataset, dataset.pixel_array))
            assert np.array_equal(converted, expected)


def test_bomb_rejections_quote_nothing_from_the_file(sample_xray: Image.Image) -> None:
    """Files that reach the new rejections while carrying a patient's name keep it out of the reason's text."""
    planted = dcmread(io.BytesIO(dicom_bytes(sample_xray)))
    planted.PatientName = "Quarrington^Zelphine"
    planted.PatientID = "MRN-0012345"
    deep = dcmread(io.BytesIO(saved(planted)))
    deep.Rows = deep.Columns = 5_000
    deep.BitsAllocated = deep.BitsStored = 32
    for data in (with_private_elements(saved(planted), MAX_ELEMENTS), saved(deep)):
        text = str(_rejection(data))
        assert "MRN" not in text
        assert "Quarrington" not in text


def test_deflated_film_is_read_after_the_check() -> None:
    """A deflated data set within the cap is inflated once for the count and read as before."""
    reference = preprocess(film_in_syntax(ExplicitVRLittleEndian)).pixels
    assert np.array_equal(preprocess(film_in_syntax(DeflatedExplicitVRLittleEndian)).pixels, reference)
