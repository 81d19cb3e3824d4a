"""DICOM display as the standard says: the modality LUT, then the VOI LUT or the first window; without either, a
robust window that makes a film look like the training films and that a burned-in marker does not move.

Films: ten validation films of the train split (five per class, never the test split), written as 12-bit DICOM by
``infra/dicom_films.py`` in each of its encodings (mid-range, narrow, rescaled, MONOCHROME1).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_windowing
from pydicom.tag import Tag

from core import dicom
from core.preprocessing import DecodedImage, ImageFormat, decode, preprocess, resize_for_model
from infra.dicom_films import FILM_ENCODINGS, FULL_SCALE, FilmEncoding, burn_marker, film_dicom
from scoring.classifier import Classifier
from tests.conftest import RELEASE_MODEL
from tests.dicom_fixtures import film_dataset, reference_film, saved
from training.data import list_split, patient_level_split

FILMS_PER_CLASS = 5
LUT_DESCRIPTOR, LUT_DATA, WINDOW_CENTER, WINDOW_WIDTH = 0x00283002, 0x00283006, 0x00281050, 0x00281051
PROBABILITY_TOLERANCE = 0.1
"""How far a DICOM film's pneumonia probability may be from its JPEG copy's (measured at most 0.06 over the
bench's 100 films without a marker)."""


@pytest.fixture(scope="module")
def films(data_root: Path) -> list[tuple[bytes, np.ndarray]]:
    """Ten validation films of train, five of each class: the JPEG's bytes and its gray levels."""
    _, validation = patient_level_split(list_split(data_root / "train"), 0.15, seed=42)
    chosen = []
    for label in (0, 1):
        files = [item for item in validation if item.label == label]
        chosen += files[:: len(files) // FILMS_PER_CLASS][:FILMS_PER_CLASS]
    return [(item.path.read_bytes(), np.asarray(Image.open(item.path).convert("L"))) for item in chosen]


@pytest.fixture(scope="module")
def release() -> Classifier:
    return Classifier.from_directory(RELEASE_MODEL)


def _shown(data: bytes) -> np.ndarray:
    """The gray levels a DICOM file is displayed with."""
    decoded = decode(data)
    assert decoded.image_format is ImageFormat.DICOM
    return np.asarray(decoded.grayscale, dtype=np.float64)


def _encoding(index: int) -> FilmEncoding:
    return FILM_ENCODINGS[index % len(FILM_ENCODINGS)]


def test_films_without_a_window_score_like_their_jpeg_with_or_without_a_marker(
    release: Classifier, films: list[tuple[bytes, np.ndarray]]
) -> None:
    """Every film as a 12-bit DICOM without a window, with and without a full-scale burned-in marker, keeps its
    JPEG's label; its probability is within 0.1 of the JPEG's (with the marker: of the JPEG with the same marker
    burned in white, so that what is measured is the display, not what the marker covers)."""
    size = release.input_size
    references, marked_references, plain, marked = [], [], [], []
    for index, (jpeg, film) in enumerate(films):
        references.append(preprocess(jpeg, size).pixels)
        white_marked = Image.fromarray(np.where(burn_marker(film.astype(np.uint16)) == FULL_SCALE, 255, film))
        marked_references.append(resize_for_model(DecodedImage(white_marked, ImageFormat.PNG, 0, 0), size).pixels)
        plain.append(preprocess(film_dicom(film, _encoding(index), window=False, marker=False), size).pixels)
        marked.append(preprocess(film_dicom(film, _encoding(index), window=False, marker=True), size).pixels)
    reference, marked_reference, shown, shown_marked = (
        np.array([prediction.pneumonia_probability for prediction in release.predict(np.stack(batch))])
        for batch in (references, marked_references, plain, marked)
    )
    threshold = release.spec.threshold
    assert np.array_equal(shown >= threshold, reference >= threshold)
    assert np.array_equal(shown_marked >= threshold, reference >= threshold)
    assert np.max(np.abs(shown - reference)) < PROBABILITY_TOLERANCE
    assert np.max(np.abs(shown_marked - marked_reference)) < PROBABILITY_TOLERANCE


def test_a_burned_in_marker_does_not_move_the_window(films: list[tuple[bytes, np.ndarray]]) -> None:
    """Outside the marker, a film with a full-scale marker is displayed like the same film without one (within 2
    gray levels on average: the film's own saturated pixels, left out of the window's estimate while they are its
    brightest value, count once a marker is brighter; 0 for most films, at most 1.8 over the bench's 100), in every
    encoding; the marker itself shows white, or black in MONOCHROME1
    (stored full scale is the darkest value there); and the film looks like its JPEG (within 12 gray levels on
    average over the films; a min-max stretch darkened them by dozens)."""
    differences = []
    for index, (_, film) in enumerate(films):
        encoding = _encoding(index)
        plain = _shown(film_dicom(film, encoding, window=False, marker=False))
        marked = _shown(film_dicom(film, encoding, window=False, marker=True))
        marker = burn_marker(np.zeros(film.shape, dtype=np.uint16)) == FULL_SCALE
        assert np.abs(marked - plain)[~marker].mean() < 2, encoding.name
        assert set(np.unique(marked[marker])) == {0.0 if encoding.monochrome1 else 255.0}, encoding.name
        differences.append(np.abs(marked - film)[~marker].mean())
    assert np.mean(differences) < 12


def test_a_window_shows_the_film_as_it_says(films: list[tuple[bytes, np.ndarray]]) -> None:
    """A window that spans the film's stored range shows the film's own gray levels (within rounding), in every
    encoding: rescaled values, MONOCHROME1 inverted; a marker beyond the window is clipped to its end."""
    for index, (_, film) in enumerate(films):
        encoding = _encoding(index)
        for marker in (False, True):
            shown = _shown(film_dicom(film, encoding, window=True, marker=marker))
            outside = burn_marker(np.zeros(film.shape, dtype=np.uint16)) == 0 if marker else np.ones(film.shape, bool)
            assert np.abs(shown - film)[outside].max() <= 1, encoding.name


def _dataset(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))


def test_a_voi_lut_comes_before_the_window(films: list[tuple[bytes, np.ndarray]]) -> None:
    """A VOI LUT Sequence is applied, not the window beside it: a 12-bit LUT that maps the film's stored range back
    to its gray levels shows the film, although the window would show it all white."""
    _, film = films[0]
    encoding = FILM_ENCODINGS[0]
    dataset = _dataset(film_dicom(film, encoding, window=False, marker=False))
    item = Dataset()
    entries = 255 * encoding.scale + 1
    levels = np.arange(entries) / encoding.scale
    item.add_new(LUT_DESCRIPTOR, "US", [entries, encoding.offset, 12])
    item.add_new(LUT_DATA, "US", [round(level * 4095 / 255) for level in levels])
    dataset.VOILUTSequence = [item]
    dataset.WindowCenter, dataset.WindowWidth = "10", "20"
    assert np.abs(_shown(saved(dataset)) - film).max() <= 1


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_windows_follow_the_standards_formulas(function: str) -> None:
    """Each VOI LUT function gives pydicom's windowing (PS3.3 C.11.2.1.2) scaled from its output range to 0-255,
    within rounding, on the 12-bit reference film with a rescale."""
    dataset = film_dataset(reference_film())
    dataset.RescaleSlope, dataset.RescaleIntercept = "0.5", "-1000"
    dataset.WindowCenter, dataset.WindowWidth, dataset.VOILUTFunction = "-300", "1200", function
    dataset = _dataset(saved(dataset))
    modality = apply_modality_lut(dataset.pixel_array, dataset)
    low, high = -1000.0, 4095 * 0.5 - 1000  # pydicom's output range: the stored range through the rescale.
    expected = (apply_windowing(modality, _dataset(saved(dataset))) - low) * 255 / (high - low)
    shown = np.asarray(dicom.decode_dicom(saved(dataset)).grayscale, dtype=np.float64)
    assert np.abs(shown - expected).max() <= 0.5 + 1e-6


@pytest.mark.parametrize(
    "window", [("1800", "0"), ("not a number", "900"), ("1800", "-5")], ids=["zero-width", "garbage", "negative"]
)
def test_an_unusable_window_is_ignored(films: list[tuple[bytes, np.ndarray]], window: tuple[str, str]) -> None:
    """A window the standard does not allow (LINEAR narrower than 1) or that is not a number is as good as none:
    the film is shown through the robust window, never rejected as corrupt."""
    _, film = films[0]
    data = film_dicom(film, FILM_ENCODINGS[0], window=False, marker=False)
    dataset = _dataset(data)
    for tag, value in zip((WINDOW_CENTER, WINDOW_WIDTH), window, strict=True):
        raw = value.encode().ljust(len(value) + len(value) % 2)  # Written as it is, as a careless sender would.
        dataset[tag] = RawDataElement(Tag(tag), "DS", len(raw), raw, 0, False, True)
    assert np.array_equal(_shown(saved(dataset)), _shown(data))


def test_constant_film_is_black_or_white() -> None:
    """A film of one value has no window to estimate: it is black, or white in MONOCHROME1."""
    flat = np.full((128, 128), 1000, dtype=np.uint16)
    assert set(np.unique(_shown(saved(film_dataset(flat))))) == {0.0}
    assert set(np.unique(_shown(saved(film_dataset(flat, monochrome1=True))))) == {255.0}
