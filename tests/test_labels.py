"""A stated label always agrees with its own number: the operating points and the three labels."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.labels import Label, OperatingPoints
from core.model_card import ServingSpec, read_card
from tests.conftest import RELEASE_MODEL

probabilities = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(probability=probabilities, screening_point=probabilities)
def test_no_label_is_stated_with_confidence_below_one_half(probability: float, screening_point: float) -> None:
    """Whatever the screening point, a label's confidence is at least 0.5 and the label is the likelier class."""
    call = OperatingPoints.around(screening_point).call(probability)
    assert call.confidence >= 0.5
    if call.label is Label.NORMAL:
        assert probability < 0.5
        assert call.confidence == pytest.approx(1.0 - probability)
    if call.label is Label.PNEUMONIA:
        assert probability >= 0.5
        assert call.confidence == pytest.approx(probability)


@given(probability=probabilities, screening_point=probabilities)
def test_only_normal_is_a_negative_screen(probability: float, screening_point: float) -> None:
    """A film is flagged (PNEUMONIA or INDETERMINATE) exactly when its probability reaches the screening point or
    0.5, whichever is lower."""
    call = OperatingPoints.around(screening_point).call(probability)
    assert call.flagged == (probability >= min(screening_point, 0.5))


def test_a_screening_point_above_one_half_makes_the_band_indeterminate() -> None:
    """With the screening point at 0.82, 0.3 is NORMAL, 0.6 INDETERMINATE and 0.9 PNEUMONIA."""
    points = OperatingPoints.around(0.82)
    assert [points.call(p).label for p in (0.3, 0.6, 0.82, 0.9)] == [
        Label.NORMAL,
        Label.INDETERMINATE,
        Label.PNEUMONIA,
        Label.PNEUMONIA,
    ]


def test_operating_points_outside_their_ranges_are_refused() -> None:
    """normal_below above 0.5 or pneumonia_from below it would let a label contradict its number."""
    with pytest.raises(ValueError, match="operating points"):
        OperatingPoints(normal_below=0.6, pneumonia_from=0.8)
    with pytest.raises(ValueError, match="operating points"):
        OperatingPoints(normal_below=0.2, pneumonia_from=0.4)


def test_a_card_without_operating_points_gets_the_band_around_its_threshold() -> None:
    """Cards written before the INDETERMINATE band keep serving, with the band between their threshold and 0.5."""
    card = read_card(RELEASE_MODEL)
    card["calibration"].pop("operating_points", None)
    card["calibration"]["threshold"] = 0.8
    assert ServingSpec.from_card(card).points == OperatingPoints(normal_below=0.5, pneumonia_from=0.8)
    card["calibration"]["operating_points"] = {"normal_below": 0.3, "pneumonia_from": 0.5}
    assert ServingSpec.from_card(card).points == OperatingPoints(normal_below=0.3, pneumonia_from=0.5)
