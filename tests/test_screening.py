"""The screening stage: its checks run in a fixed order and the first refusal decides; the film-condition head is
plain arrays checked against the card; films smaller than the model's input, partial, inverted and turned films are
REJECTED with their reasons, while clean films are scored."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.film_condition import CLEAN, STATISTIC_COUNT, UNJUDGED, ConditionHead, ConditionHeadError
from core.model_card import CARD_FILE, MODEL_FILE, SCREENING_FILE, ModelArtifactError, read_card, sha256_of
from core.model_registry import ModelRegistry
from core.rejections import InvalidImageError, RejectionReason
from core.screening import (
    HEAD_CHECKS,
    INVERTED,
    PARTIAL,
    ROTATED,
    TOO_FEW_PIXELS,
    Films,
    ScreeningStage,
    SourceResolutionCheck,
    build_stage,
    minimum_source_side,
)
from scoring.classifier import Classifier, Prediction
from scoring.scorer import score_files
from tests.conftest import MODEL_BUCKET, RELEASE_MODEL
from training import film_variants
from training.screening import MINIMUM_CLEAN_KEPT, THRESHOLD_CEILING, THRESHOLD_FLOOR, clean_threshold

FEATURES = 4
CLASSES = film_variants.CLASSES


@dataclass(frozen=True)
class RefuseAll:
    """A check that refuses every film with its own reason and detail."""

    name: str
    reason: RejectionReason
    detail: str
    figures: Mapping[str, Any] = field(default_factory=dict)

    def judge(self, films: Films) -> list[str | None]:
        return [self.detail] * len(films)


def films(count: int, size: int = 16, source: tuple[int, int] = (224, 224), features: bool = True) -> Films:
    pixels = np.random.default_rng(0).integers(0, 256, (count, size, size, 1), dtype=np.uint8)
    return Films(pixels, np.zeros((count, FEATURES)) if features else None, (source,) * count)


def head_choosing(class_name: str, threshold: float = 0.5) -> ConditionHead:
    """A head whose bias makes ``class_name`` by far the likeliest class for any input."""
    inputs = FEATURES + STATISTIC_COUNT
    bias = np.zeros(len(CLASSES))
    bias[CLASSES.index(class_name)] = 20.0
    return ConditionHead(
        classes=CLASSES,
        input_mean=np.zeros(inputs),
        input_scale=np.ones(inputs),
        weights=np.zeros((inputs, len(CLASSES))),
        bias=bias,
        clean_threshold=threshold,
    )


def test_first_refusing_check_decides() -> None:
    """Every check judges every film, but a film's refusal is the first one in the stage's order."""
    stage = ScreeningStage(
        (
            RefuseAll("first", RejectionReason.NON_DIAGNOSTIC_IMAGE, "first detail"),
            RefuseAll("second", RejectionReason.ROTATED_IMAGE, "second detail"),
        )
    )
    [refusal] = stage.screen(films(1))
    assert refusal is not None
    assert (refusal.check, refusal.reason, refusal.detail) == (
        "first",
        RejectionReason.NON_DIAGNOSTIC_IMAGE,
        "first detail",
    )


def test_stage_runs_gate_resolution_then_head_checks() -> None:
    """An artifact's stage runs the input gate, the source resolution and the head's checks in that order."""
    release = Classifier.from_directory(RELEASE_MODEL)
    stage = build_stage(192, release.gate, head_choosing(CLEAN))
    assert stage.names == ("input_gate", "source_resolution", *(name for name, _, _, _ in HEAD_CHECKS))
    assert build_stage(192).names == ("source_resolution",)


def test_source_smaller_than_three_quarters_of_the_input_is_refused() -> None:
    """A file whose shorter side is below 3/4 of the model's input is NON_DIAGNOSTIC_IMAGE; one just above passes."""
    side = minimum_source_side(192)
    assert side == 144
    check = SourceResolutionCheck(side)
    small = Films(films(3).pixels, None, ((64, 64), (500, side - 1), (side, 2000)))
    assert check.judge(small) == [TOO_FEW_PIXELS, TOO_FEW_PIXELS, None]
    assert check.reason is RejectionReason.NON_DIAGNOSTIC_IMAGE


@pytest.mark.parametrize(
    ("condition", "reason", "detail"),
    [
        ("inverted", RejectionReason.INVERTED_IMAGE, INVERTED),
        ("rotated_180", RejectionReason.ROTATED_IMAGE, ROTATED),
        ("partial", RejectionReason.NON_DIAGNOSTIC_IMAGE, PARTIAL),
    ],
)
def test_head_condition_maps_to_its_check(condition: str, reason: RejectionReason, detail: str) -> None:
    """The head's likeliest condition decides which check refuses the film, with that check's reason and detail."""
    stage = build_stage(16, head=head_choosing(condition))
    [refusal] = stage.screen(films(1))
    assert refusal is not None
    assert (refusal.reason, refusal.detail) == (reason, detail)


def test_clean_film_passes_every_check() -> None:
    """A film of a large enough source that the head reads as clean is let through."""
    assert build_stage(16, head=head_choosing(CLEAN)).screen(films(2)) == [None, None]


def test_film_the_head_cannot_judge_is_refused() -> None:
    """Features that are not finite numbers give no condition, and the film is refused, never guessed."""
    head = head_choosing(CLEAN)
    batch = films(1)
    unreadable = Films(batch.pixels, np.full((1, FEATURES), np.nan), batch.source_sizes)
    assert head.conditions(unreadable.pixels, np.full((1, FEATURES), np.nan)) == [UNJUDGED]
    [refusal] = build_stage(16, head=head).screen(unreadable)
    assert refusal is not None
    assert (refusal.check, refusal.reason) == ("condition_judged", RejectionReason.NON_DIAGNOSTIC_IMAGE)


def test_threshold_lets_clean_below_ceiling_pass() -> None:
    """A film is clean when P(clean) reaches the head's threshold, even when another class is likelier."""
    head = head_choosing("blurred", threshold=1e-12)
    assert head.conditions(films(1).pixels, np.zeros((1, FEATURES))) == [CLEAN]


def test_clean_threshold_keeps_the_required_share() -> None:
    """The threshold is the ceiling unless that refuses more clean validation films than allowed; then it falls
    just far enough, but never below the floor."""
    assert clean_threshold(np.full(1000, 0.9)) == THRESHOLD_CEILING
    probabilities = np.concatenate([np.full(990, 0.9), np.linspace(0.02, 0.1, 10)])
    threshold = clean_threshold(probabilities)
    assert np.mean(probabilities >= threshold) == MINIMUM_CLEAN_KEPT
    assert THRESHOLD_FLOOR < threshold < THRESHOLD_CEILING
    assert clean_threshold(np.concatenate([np.full(99, 0.9), [1e-6]])) == THRESHOLD_FLOOR


def test_head_round_trips_as_plain_arrays(tmp_path: Path) -> None:
    """The head is saved and read back without pickles, equal in every array."""
    head = head_choosing("occluded", threshold=0.25)
    path = tmp_path / SCREENING_FILE
    head.save(path)
    loaded = ConditionHead.load(path)
    assert loaded.classes == head.classes
    assert loaded.clean_threshold == head.clean_threshold
    np.testing.assert_array_equal(loaded.weights, head.weights)


def test_pickled_screening_file_is_not_executed(tmp_path: Path) -> None:
    """A screening file holding pickled objects is refused, never unpickled."""
    path = tmp_path / SCREENING_FILE
    buffer = io.BytesIO()
    np.savez(buffer, classes=np.array([object()], dtype=object))
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ConditionHeadError):
        ConditionHead.load(path)


def test_head_for_other_features_is_refused() -> None:
    """A head fitted on features of another length cannot be loaded with the release model."""
    release = Classifier.from_directory(RELEASE_MODEL)
    with pytest.raises(ModelArtifactError, match="features"):
        Classifier(RELEASE_MODEL / MODEL_FILE, release.spec, gate=release.gate, head=head_choosing(CLEAN))


def test_head_without_a_class_for_every_check_is_refused() -> None:
    """A head whose classes are not the checks' (a class nothing would refuse) is never served."""
    head = head_choosing(CLEAN)
    fewer = ConditionHead(
        classes=head.classes[:-1],
        input_mean=head.input_mean,
        input_scale=head.input_scale,
        weights=head.weights[:, :-1],
        bias=head.bias[:-1],
        clean_threshold=0.5,
    )
    with pytest.raises(ConditionHeadError, match="classes"):
        build_stage(16, head=fewer)


def test_small_file_is_refused_through_the_scorer(sample_xray: Image.Image) -> None:
    """A 64 px thumbnail of a film (above the decoder's minimum) is NON_DIAGNOSTIC_IMAGE, the film itself scored,
    even for the release model without a film-condition head."""
    release = Classifier.from_directory(RELEASE_MODEL)
    film, thumbnail = io.BytesIO(), io.BytesIO()
    sample_xray.save(film, format="PNG")
    sample_xray.resize((64, 64)).save(thumbnail, format="PNG")
    scored, refused = score_files(release, [film.getvalue(), thumbnail.getvalue()])
    assert isinstance(scored, Prediction)
    assert isinstance(refused, InvalidImageError)
    assert (refused.reason, refused.detail) == (RejectionReason.NON_DIAGNOSTIC_IMAGE, TOO_FEW_PIXELS)


# The tests below need an artifact with a fitted head: the release model given one, on a sample of the data.


def test_attached_head_is_a_new_version_with_the_same_model(screened_release: Path) -> None:
    """attach-screening writes a new version whose card names the head's file, sha256, order and figures, with the
    same model file, and the artifact loads with the whole stage."""
    card = read_card(screened_release)
    original = read_card(RELEASE_MODEL)
    section = card["screening"]
    assert card["version"] != original["version"]
    assert card["derived_from"]["version"] == original["version"]
    assert card["model_sha256"] == original["model_sha256"] == sha256_of(screened_release / MODEL_FILE)
    assert section["sha256"] == sha256_of(screened_release / SCREENING_FILE)
    assert THRESHOLD_FLOOR <= section["clean_threshold"] <= THRESHOLD_CEILING
    assert 0.0 <= section["validation"]["clean_kept"] <= 1.0
    assert [check["name"] for check in section["checks"]] == list(section["order"])
    classifier = Classifier.from_directory(screened_release)
    assert classifier.screening.names == tuple(section["order"])
    assert "test_kept" not in section


def test_tampered_screening_file_is_refused(screened_release: Path, tmp_path: Path) -> None:
    """A screening file that does not match the card's sha256 is never served."""
    artifact = tmp_path / "tampered"
    artifact.mkdir()
    for path in screened_release.iterdir():
        if path.is_file():
            (artifact / path.name).write_bytes(path.read_bytes())
    with (artifact / SCREENING_FILE).open("ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ModelArtifactError, match="sha256"):
        Classifier.from_directory(artifact)


def test_card_naming_another_screening_file_is_refused(screened_release: Path, tmp_path: Path) -> None:
    """The head's file name is fixed, so a card cannot point the scorer at another path."""
    artifact = tmp_path / "renamed"
    artifact.mkdir()
    for path in screened_release.iterdir():
        if path.is_file():
            (artifact / path.name).write_bytes(path.read_bytes())
    card = read_card(artifact)
    card["screening"]["file"] = "../other.npz"
    (artifact / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelArtifactError, match="screening"):
        Classifier.from_directory(artifact)


def test_registry_round_trip_carries_the_head(screened_release: Path, s3: Any, tmp_path: Path) -> None:
    """Publishing uploads screening.npz, and downloading the version brings it back, verified and loaded."""
    registry = ModelRegistry(s3, MODEL_BUCKET)
    prefix = registry.publish(screened_release)
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=MODEL_BUCKET)["Contents"]}
    assert f"{prefix}{SCREENING_FILE}" in keys
    spec = registry.download(prefix, tmp_path / "downloaded")
    assert spec.screening_sha256 == sha256_of(tmp_path / "downloaded" / SCREENING_FILE)
    assert Classifier.from_directory(tmp_path / "downloaded").head is not None


def test_sample_films_are_kept(screened_release: Path, sample_paths: list[Path]) -> None:
    """Every sample X-ray passes the whole stage and is scored."""
    classifier = Classifier.from_directory(screened_release)
    results = score_files(classifier, [path.read_bytes() for path in sample_paths])
    assert all(isinstance(result, Prediction) for result in results), results


def test_turned_inverted_and_partial_films_are_refused(screened_release: Path, sample_xray: Image.Image) -> None:
    """A sample film inverted, upside down, turned a quarter and cut to its top-left quarter (blown up again) is
    refused with the reason of its condition."""
    classifier = Classifier.from_directory(screened_release)
    rng = np.random.default_rng(0)
    quarter = sample_xray.crop((0, 0, sample_xray.width // 2, sample_xray.height // 2)).resize(sample_xray.size)
    variants = {
        RejectionReason.INVERTED_IMAGE: film_variants.inverted(sample_xray, rng),
        RejectionReason.ROTATED_IMAGE: film_variants.rotated_180(sample_xray, rng),
        RejectionReason.NON_DIAGNOSTIC_IMAGE: quarter,
    }
    payloads = []
    for image in variants.values():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payloads.append(buffer.getvalue())
    results = score_files(classifier, payloads)
    for reason, result in zip(variants, results, strict=True):
        assert isinstance(result, InvalidImageError), reason
        assert result.reason is reason
