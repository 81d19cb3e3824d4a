"""Knowledge distillation: the fast student learns from the teacher's softened probabilities, and the serving rule.

The teacher (a fine-tuned pretrained network) is the better classifier; the student (the compact CNN) is the
faster one. The student is trained on a mix of the true label and the teacher's calibrated probability softened
by a temperature (Hinton et al., 2015), over the training images only.

Which of the two is served is decided before the test split is read, from what the serving budget allows:
the teacher when its exported model meets the speed and size budget, the student otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.calibration import sigmoid

SERVING_MODEL_BUDGET_MS = 10.0
"""Largest single-thread LiteRT time per image (measured at export) for the teacher to be served: the speed bar
is 15 ms from a full-resolution JPEG's bytes to its result, and decoding and resizing take the rest."""

SERVING_MODEL_BUDGET_BYTES = 20_000_000
"""Largest served model file."""


def soft_targets(
    labels: np.ndarray, teacher_logits: np.ndarray, calibration_temperature: float, weight: float, temperature: float
) -> np.ndarray:
    """The student's targets: ``weight`` x the teacher's softened probability + ``(1 - weight)`` x the label.

    The teacher's logits are first calibrated (divided by its validation temperature), then softened by the
    distillation temperature, so a confident teacher still passes on which films it found harder."""
    softened = sigmoid(teacher_logits, calibration_temperature * temperature)
    return np.asarray(weight * softened + (1.0 - weight) * np.asarray(labels, dtype=np.float64), dtype=np.float32)


@dataclass(frozen=True)
class ServingChoice:
    """Which model is served, and why."""

    served: str
    reason: str


def choose_served(
    requested: str,
    teacher_milliseconds: float,
    teacher_bytes: int,
    has_student: bool,
) -> ServingChoice:
    """Apply the serving rule: ``requested`` is ``auto``, ``teacher`` or ``student``."""
    if requested != "auto":
        return ServingChoice(requested, f"requested with serve={requested}")
    if not has_student:
        return ServingChoice("teacher", "no student was trained")
    within_budget = teacher_milliseconds <= SERVING_MODEL_BUDGET_MS and teacher_bytes <= SERVING_MODEL_BUDGET_BYTES
    measured = f"teacher {teacher_milliseconds:.2f} ms per image and {teacher_bytes / 1e6:.1f} MB"
    budget = f"budget {SERVING_MODEL_BUDGET_MS} ms and {SERVING_MODEL_BUDGET_BYTES / 1e6:.0f} MB"
    if within_budget:
        return ServingChoice("teacher", f"{measured} is within the {budget}")
    return ServingChoice("student", f"{measured} exceeds the {budget}")
