"""The validated population: stated ages read as years, the card's population section, and the check that rejects
an age outside the accepted range with a detail that never quotes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from core.config import ConfigurationError
from core.model_card import ModelArtifactError, ServingSpec, read_card
from core.population import (
    DEFAULT_POPULATION,
    AgeRange,
    AgeRangeOverride,
    Population,
    age_in_years,
    check_stated_age,
)
from core.rejections import InvalidImageError, RejectionReason
from infra.corpus import dicom_bytes
from infra.dicom_films import with_patient_age
from pneumoscan.cli import main
from scoring.image_store import PATIENT_AGE_METADATA
from scoring.settings import Settings
from tests.conftest import RELEASE_MODEL, REPOSITORY_ROOT


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("062Y", 62.0),
        ("045Y", 45.0),
        ("18", 18.0),
        ("004Y", 4.0),
        ("030M", 2.5),
        ("010D", 10 / 365.25),
        ("002W", 14 / 365.25),
        ("4y", 4.0),
        (" 007Y ", 7.0),
        ("4.5", 4.5),
        ("216M", 18.0),
    ],
)
def test_stated_ages_are_read_as_years(text: str, years: float) -> None:
    """DICOM Age Strings (nnnD, nnnW, nnnM, nnnY, any case, padded) and plain numbers (years) are read as years."""
    assert age_in_years(text) == pytest.approx(years)


@pytest.mark.parametrize("text", [None, "", "   ", "garbage", "Y", "-5", "062X", "12 years", "1e3", "0x10", b"004Y", 4])
def test_unreadable_ages_state_no_age(text: object) -> None:
    """A missing value, an empty one, or anything that is not an age string or a plain number states no age."""
    assert age_in_years(text) is None


def test_the_default_range_refuses_adults_and_keeps_children() -> None:
    """By default, ages from 0 to under 18 years are accepted: 18 (plain), 45 and 62 years are OUTSIDE_VALIDATED_
    POPULATION, 4 years, 30 months, 10 days and no stated age are not; the detail names the range only."""
    accepted = DEFAULT_POPULATION.accepted
    for text in ("062Y", "045Y", "18", "216M"):
        with pytest.raises(InvalidImageError) as raised:
            check_stated_age(age_in_years(text), accepted)
        assert raised.value.reason is RejectionReason.OUTSIDE_VALIDATED_POPULATION
        assert raised.value.detail == (
            "the stated patient age is outside the model's validated population (accepted: 0 to under 18 years)"
        )
    for text in ("004Y", "030M", "010D", None, "garbage"):
        check_stated_age(age_in_years(text), accepted)


def test_a_rejection_never_quotes_the_age() -> None:
    """The rejection's detail and message are the same whatever age was stated: they name the accepted range."""
    details = set()
    for age in (18.0, 23.0, 62.5, 99.0):
        with pytest.raises(InvalidImageError) as raised:
            check_stated_age(age, AgeRange(1, 12))
        details.add(str(raised.value))
        assert "23" not in str(raised.value)
        assert "62" not in str(raised.value)
    assert len(details) == 1


def test_card_without_a_population_gets_the_default() -> None:
    """A card written before the population section existed (the release's) serves with the default population:
    pediatric, the data set's ages 1 to 5, accepted 0 to under 18 years."""
    card = read_card(RELEASE_MODEL)
    card.pop("population", None)
    spec = ServingSpec.from_card(card)
    assert spec.population == DEFAULT_POPULATION
    assert spec.population.data_set_ages_years == (1.0, 5.0)
    assert spec.population.accepted == AgeRange(0.0, 18.0)


def test_card_population_section_is_read_and_written_alike() -> None:
    """A card's population section is what the scorer serves with, and the default's section reads back as it."""
    card = read_card(RELEASE_MODEL)
    card["population"] = {
        "description": "pediatric chest radiographs",
        "data_set_ages_years": [1, 5],
        "accepted_age_years": {"min": 0.5, "max_exclusive": 12},
    }
    assert ServingSpec.from_card(card).population.accepted == AgeRange(0.5, 12.0)
    assert Population.from_card(DEFAULT_POPULATION.to_card()) == DEFAULT_POPULATION
    assert DEFAULT_POPULATION.to_card()["accepted_age_years"] == {"min": 0, "max_exclusive": 18}


@pytest.mark.parametrize(
    "section",
    [
        {"description": "x"},
        {"description": "x", "accepted_age_years": {"min": 18, "max_exclusive": 1}},
        {"description": "x", "accepted_age_years": {"min": -1, "max_exclusive": 1}},
        {"description": "x", "accepted_age_years": "0-18"},
    ],
    ids=["no-range", "reversed", "negative", "not-a-section"],
)
def test_malformed_population_section_is_an_artifact_error(section: dict[str, object]) -> None:
    """A card whose population section lacks its range, or states an empty or negative one, is not served."""
    card = read_card(RELEASE_MODEL)
    card["population"] = section
    with pytest.raises(ModelArtifactError):
        ServingSpec.from_card(card)


def test_an_override_replaces_only_the_bounds_it_gives() -> None:
    """Deployment bounds replace the card's one by one: a maximum alone keeps the card's minimum."""
    card_range = AgeRange(0, 18)
    assert AgeRangeOverride().applied_to(card_range) == card_range
    assert AgeRangeOverride(max_years_exclusive=12).applied_to(card_range) == AgeRange(0, 12)
    assert AgeRangeOverride(min_years=1, max_years_exclusive=6).applied_to(card_range) == AgeRange(1, 6)


BASE_ENVIRONMENT = {"RESULTS_TABLE": "results", "INPUT_BUCKET": "input", "MODEL_PATH": str(RELEASE_MODEL)}


def test_settings_read_the_deployments_age_bounds() -> None:
    """MIN_PATIENT_AGE_YEARS and MAX_PATIENT_AGE_YEARS are read once into the settings; unset or empty (the
    template's default) leaves the card's bound."""
    assert Settings.from_environment(BASE_ENVIRONMENT).accepted_ages == AgeRangeOverride()
    empty = {**BASE_ENVIRONMENT, "MIN_PATIENT_AGE_YEARS": "", "MAX_PATIENT_AGE_YEARS": ""}
    assert Settings.from_environment(empty).accepted_ages == AgeRangeOverride()
    both = {**BASE_ENVIRONMENT, "MIN_PATIENT_AGE_YEARS": "0.5", "MAX_PATIENT_AGE_YEARS": "12"}
    assert Settings.from_environment(both).accepted_ages == AgeRangeOverride(0.5, 12.0)


@pytest.mark.parametrize(
    "bounds",
    [
        {"MAX_PATIENT_AGE_YEARS": "adult"},
        {"MIN_PATIENT_AGE_YEARS": "-1"},
        {"MIN_PATIENT_AGE_YEARS": "12", "MAX_PATIENT_AGE_YEARS": "6"},
    ],
    ids=["not-a-number", "negative", "reversed"],
)
def test_malformed_age_bounds_are_a_configuration_error(bounds: dict[str, str]) -> None:
    """An age bound that is not a number of years, or a minimum not below the maximum, stops the function at
    start-up instead of rejecting or scoring the wrong patients."""
    with pytest.raises(ConfigurationError, match="PATIENT_AGE_YEARS"):
        Settings.from_environment({**BASE_ENVIRONMENT, **bounds})


def test_pneumoscan_score_rejects_a_dicom_stating_an_adult_age(
    tmp_path: Path, sample_xray: Image.Image, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pneumoscan score` on local files (no object metadata) applies the DICOM's stated age with the card's range:
    62 years is OUTSIDE_VALIDATED_POPULATION, 4 years is scored, and the output never quotes the age."""
    film = dicom_bytes(sample_xray)
    adult, child = tmp_path / "adult.dcm", tmp_path / "child.dcm"
    adult.write_bytes(with_patient_age(film, "062Y"))
    child.write_bytes(with_patient_age(film, "004Y"))
    assert main(["score", "--model", str(RELEASE_MODEL), str(adult), str(child)]) == 1
    output = capsys.readouterr().out
    lines = {json.loads(line)["path"]: json.loads(line) for line in output.splitlines()}
    assert lines[str(adult)]["reason"] == "OUTSIDE_VALIDATED_POPULATION"
    assert lines[str(child)]["label"] in {"NORMAL", "PNEUMONIA"}
    assert "062Y" not in output


def test_readme_documents_the_metadata_key_and_the_rule() -> None:
    """The README names the object metadata key the function reads, the default range and that an upload stating
    no age is scored."""
    readme = (REPOSITORY_ROOT / "README.md").read_text()
    assert f"--metadata {PATIENT_AGE_METADATA}=4" in readme
    assert f"x-amz-meta-{PATIENT_AGE_METADATA}" in readme
    assert "**An upload that states no age is scored**" in readme
    assert f"accepted ages {DEFAULT_POPULATION.accepted.describe()}" in readme
