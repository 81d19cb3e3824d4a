"""Distillation targets, the serving rule and the export gate: pure functions, no training."""

from __future__ import annotations

import numpy as np
import pytest

from training.distill import SERVING_MODEL_BUDGET_MS, choose_served, soft_targets
from training.export import PARITY_TOLERANCE, ExportCandidate


def test_soft_targets_mix_label_and_softened_teacher() -> None:
    """Weight 0 gives the labels, weight 1 the teacher's calibrated probability, a temperature softens it."""
    labels = np.array([0, 1, 1])
    logits = np.array([-4.0, 0.0, 6.0])
    assert soft_targets(labels, logits, 2.0, weight=0.0, temperature=1.0) == pytest.approx(labels)
    teacher = 1 / (1 + np.exp(-logits / 2.0))
    assert soft_targets(labels, logits, 2.0, weight=1.0, temperature=1.0) == pytest.approx(teacher, abs=1e-6)
    softened = soft_targets(labels, logits, 2.0, weight=1.0, temperature=3.0)
    assert np.all(np.abs(softened - 0.5) <= np.abs(teacher - 0.5) + 1e-9)
    mixed = soft_targets(labels, logits, 2.0, weight=0.5, temperature=1.0)
    assert mixed == pytest.approx(0.5 * teacher + 0.5 * labels, abs=1e-6)


def test_teacher_is_served_within_the_budget_and_the_student_beyond_it() -> None:
    """The automatic rule looks at the teacher's measured speed and size only, never at test data."""
    assert choose_served("auto", SERVING_MODEL_BUDGET_MS - 1, 13_000_000, has_student=True).served == "teacher"
    slow = choose_served("auto", SERVING_MODEL_BUDGET_MS + 1, 13_000_000, has_student=True)
    assert slow.served == "student"
    assert "exceeds" in slow.reason
    assert choose_served("auto", 5.0, 25_000_000, has_student=True).served == "student"
    assert choose_served("auto", SERVING_MODEL_BUDGET_MS + 1, 1, has_student=False).served == "teacher"
    assert choose_served("student", 1.0, 1, has_student=True).served == "student"


def _candidate(difference: float, flips: int) -> ExportCandidate:
    return ExportCandidate("float32", 1, difference, 1.0, flips, 1.0, validation_auc=0.99, keras_validation_auc=0.99)


def test_export_gate_compares_probabilities_and_labels() -> None:
    """A candidate within the probability tolerance still fails when it flips a label far from the threshold."""
    assert _candidate(PARITY_TOLERANCE / 2, 0).passes
    assert not _candidate(PARITY_TOLERANCE / 2, 1).passes
    assert not _candidate(PARITY_TOLERANCE * 2, 0).passes
    assert not _candidate(float("nan"), 0).passes
