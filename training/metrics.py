"""Quality metrics of a binary screening model, with bootstrap 95% confidence intervals.

Every metric comes from scikit-learn where it has one; expected calibration error is the usual equal-width
binned estimate (Guo et al., 2017). The figures are the screening view: a film is flagged when it is not called
NORMAL (``core.labels``), so sensitivity = (PNEUMONIA + INDETERMINATE) / positives and specificity = NORMAL /
negatives; the share called INDETERMINATE is reported beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from core.labels import OperatingPoints

ECE_BINS = 15
METRIC_NAMES = (
    "accuracy",
    "auc",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "expected_calibration_error",
    "brier_score",
)
"""Every metric with an interval, in the order reports list them."""

HEADLINE_METRICS = ("accuracy", "auc", "sensitivity", "specificity", "expected_calibration_error")
"""The figures that summaries (the train command's output, the card's comparison, the benchmark) show."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap 95% interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Evaluation:
    """Everything the model card reports about one split."""

    count: int
    threshold: float
    """The screening point: flagged at or above it (``normal_below``)."""
    pneumonia_from: float
    indeterminate_share: float
    """The share of films called INDETERMINATE (between the two operating points)."""
    accuracy: Interval
    auc: Interval
    sensitivity: Interval
    specificity: Interval
    precision: Interval
    f1: Interval
    expected_calibration_error: Interval
    brier_score: Interval
    confusion_matrix: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """Weighted mean gap between PNEUMONIA frequency and mean predicted probability over equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    bin_index = np.clip(np.digitize(probabilities, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for index in range(bins):
        in_bin = bin_index == index
        if in_bin.any():
            error += in_bin.mean() * abs(labels[in_bin].mean() - probabilities[in_bin].mean())
    return float(error)


def _point_metrics(threshold: float) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    def predicted(probabilities: np.ndarray) -> np.ndarray:
        return (probabilities >= threshold).astype(int)

    return {
        "accuracy": lambda y, p: float(accuracy_score(y, predicted(p))),
        "auc": lambda y, p: float(roc_auc_score(y, p)),
        "sensitivity": lambda y, p: float(recall_score(y, predicted(p), pos_label=1, zero_division=0.0)),
        "specificity": lambda y, p: float(recall_score(y, predicted(p), pos_label=0, zero_division=0.0)),
        "precision": lambda y, p: float(precision_score(y, predicted(p), zero_division=0.0)),
        "f1": lambda y, p: float(f1_score(y, predicted(p), zero_division=0.0)),
        "expected_calibration_error": expected_calibration_error,
        "brier_score": lambda y, p: float(brier_score_loss(y, p)),
    }


def evaluate(
    labels: np.ndarray, probabilities: np.ndarray, points: OperatingPoints, resamples: int = 1000, seed: int = 0
) -> Evaluation:
    """Screening metrics of calibrated PNEUMONIA probabilities at the operating points, with percentile bootstrap
    intervals."""
    threshold = points.normal_below
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.shape != probabilities.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and probabilities {probabilities.shape} must be equal-length 1-D")
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError("evaluation needs both NORMAL and PNEUMONIA cases")
    metrics = _point_metrics(threshold)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in metrics}
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        if labels[index].min() == labels[index].max():
            continue  # A resample with one class has no AUC; it is skipped.
        for name, metric in metrics.items():
            samples[name].append(metric(labels[index], probabilities[index]))
    intervals = {
        name: Interval(
            value=metric(labels, probabilities),
            low=float(np.percentile(samples[name], 2.5)),
            high=float(np.percentile(samples[name], 97.5)),
        )
        for name, metric in metrics.items()
    }
    true_negative, false_positive, false_negative, true_positive = confusion_matrix(
        labels, (probabilities >= threshold).astype(int), labels=[0, 1]
    ).ravel()
    indeterminate = (probabilities >= points.normal_below) & (probabilities < points.pneumonia_from)
    return Evaluation(
        count=len(labels),
        threshold=threshold,
        pneumonia_from=points.pneumonia_from,
        indeterminate_share=float(indeterminate.mean()),
        confusion_matrix={
            "true_negative": int(true_negative),
            "false_positive": int(false_positive),
            "false_negative": int(false_negative),
            "true_positive": int(true_positive),
        },
        **intervals,
    )


def family_breakdown(
    families: list[str], labels: np.ndarray, probabilities: np.ndarray, threshold: float
) -> dict[str, dict[str, float]]:
    """Per image family: how many films, the share called correctly at ``threshold`` (specificity for a family
    of normals, sensitivity for one of pneumonia) and the mean PNEUMONIA probability."""
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    correct = (probabilities >= threshold).astype(int) == labels
    breakdown: dict[str, dict[str, float]] = {}
    for family in sorted(set(families)):
        members = np.array([f == family for f in families])
        breakdown[family] = {
            "count": int(members.sum()),
            "share_correct": float(correct[members].mean()),
            "mean_probability": float(probabilities[members].mean()),
        }
    return breakdown


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline figures of one split's evaluation (``Evaluation.to_dict()``), rounded to four places."""
    return {name: round(float(metrics[name]["value"]), 4) for name in HEADLINE_METRICS}
