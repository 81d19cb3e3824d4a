"""Calibration, threshold and metric code agrees with scikit-learn and with hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from core.labels import OperatingPoints
from training.calibration import choose_threshold, fit_temperature, sigmoid
from training.metrics import evaluate, expected_calibration_error


def _synthetic(seed: int, count: int = 2000, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.5, count)
    labels = (rng.random(count) < sigmoid(true_logits)).astype(int)
    return labels, true_logits * temperature


def test_temperature_recovers_a_known_overconfidence() -> None:
    """Logits inflated threefold are scaled back by a fitted temperature near 3."""
    labels, logits = _synthetic(seed=0, count=20000, temperature=3.0)
    assert fit_temperature(labels, logits) == pytest.approx(3.0, rel=0.08)


def test_temperature_scaling_lowers_calibration_error() -> None:
    """After scaling, the expected calibration error of overconfident logits drops."""
    labels, logits = _synthetic(seed=1, temperature=4.0)
    before = expected_calibration_error(labels, sigmoid(logits))
    after = expected_calibration_error(labels, sigmoid(logits, fit_temperature(labels, logits)))
    assert after < before / 2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.sampled_from([0.9, 0.95, 0.97, 1.0]))
def test_threshold_is_the_highest_meeting_the_sensitivity_target(seed: int, target: float) -> None:
    """The chosen threshold meets the target; any higher observed score as threshold misses it."""
    labels, logits = _synthetic(seed, count=300)
    probabilities = sigmoid(logits)
    threshold = choose_threshold(labels, probabilities, target)
    sensitivity = recall_score(labels, probabilities >= threshold)
    assert sensitivity >= target
    higher = np.unique(probabilities[probabilities > threshold])
    if len(higher):
        assert recall_score(labels, probabilities >= higher[0]) < target


def test_metrics_agree_with_scikit_learn() -> None:
    """Point estimates equal scikit-learn's, and each lies inside its bootstrap interval."""
    labels, logits = _synthetic(seed=3, count=600)
    probabilities = sigmoid(logits)
    result = evaluate(labels, probabilities, OperatingPoints.around(0.5), resamples=200)
    predicted = probabilities >= 0.5
    assert result.accuracy.value == pytest.approx(accuracy_score(labels, predicted))
    assert result.auc.value == pytest.approx(roc_auc_score(labels, probabilities))
    assert result.sensitivity.value == pytest.approx(recall_score(labels, predicted))
    assert result.specificity.value == pytest.approx(recall_score(1 - labels, ~predicted))
    for interval in (result.accuracy, result.auc, result.sensitivity, result.expected_calibration_error):
        assert interval.low <= interval.value <= interval.high
    matrix = result.confusion_matrix
    assert matrix["true_positive"] == int((predicted & (labels == 1)).sum())
    assert sum(matrix.values()) == 600


def test_expected_calibration_error_of_hand_checked_case() -> None:
    """Two bins, one off by 0.3 and one exact, give an ECE of 0.15."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    probabilities = np.array([0.3] * 5 + [0.9] * 5)
    # Bin at 0.3 holds four NORMAL and one PNEUMONIA (frequency 0.2); bin at 0.9 holds five PNEUMONIA (1.0).
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)


def test_evaluation_needs_both_classes() -> None:
    """A split with one class cannot be evaluated, and says so."""
    with pytest.raises(ValueError, match="both"):
        evaluate(np.ones(10, dtype=int), np.full(10, 0.9), OperatingPoints.around(0.5))
