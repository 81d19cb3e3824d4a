"""Fitting the input gate (``core.input_gate``) on training X-rays, and the served model that feeds it.

The gate is fitted on the fit split's films only; its distance threshold and the check that it keeps real films
use the validation split. The test split is only reported on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from core.input_gate import STATISTIC_NAMES, InputGate, image_statistics
from core.model_card import GATE_FILE

logger = logging.getLogger(__name__)

POOLED_FEATURES_LAYER = "pool"
"""The global average pooling layer whose output the gate reads (the input of the logit unit's dropout)."""

COMPONENTS = 64
"""Principal components of the within-class feature scatter kept by the probabilistic-PCA covariance."""

DISTANCE_MARGIN = 1.25
"""The distance threshold is this multiple of the largest validation distance. Validation films come from the same
hospital and years as the training films; films of other sites sit further out, and a real film refused is a
screening missed, so the threshold keeps every validation film and a quarter more. Fixed before the test split was
ever scored with a gate."""

STATISTIC_MARGIN = 2.0
"""Each image statistic's accepted range is the training films' range, its lower end divided and its upper end
multiplied by this factor."""

RESIDUAL_VARIANCE_FLOOR = 0.01
"""The variance outside the components is at least this share of the mean variance per feature: with fewer films
than features (smoke runs), the sample has no variance at all in most directions."""

MINIMUM_VALIDATION_KEPT = 0.995
"""A fitted gate must accept at least this share of the validation films, or training fails."""


class GateFitError(RuntimeError):
    """The gate would refuse too many real validation films, or cannot be fitted from the data given."""


@dataclass(frozen=True)
class FittedGate:
    """A gate with what its fitting measured."""

    gate: InputGate
    fit_images: int
    validation_kept: float
    largest_validation_distance: float

    def card_section(self, sha256: str, test_kept: float | None = None) -> dict[str, Any]:
        """The model card's ``input_gate`` section."""
        bounds = self.gate.statistic_bounds
        return {
            "file": GATE_FILE,
            "sha256": sha256,
            "reason": "NOT_A_CHEST_XRAY",
            "method": (
                "Mahalanobis distance per feature of the model's pooled penultimate features to the nearer class "
                f"mean, covariance by probabilistic PCA ({len(self.gate.component_variances)} components of the "
                "within-class scatter and one variance for the rest), plus the contrast and detail of the input"
            ),
            "fit_images": self.fit_images,
            "distance_threshold": self.gate.distance_threshold,
            "distance_rule": f"{DISTANCE_MARGIN} x the largest validation distance "
            f"({self.largest_validation_distance:.4f})",
            "statistics": {
                name: {"low": float(low), "high": float(high)}
                for name, (low, high) in zip(STATISTIC_NAMES, bounds, strict=True)
            },
            "statistics_rule": f"the fit films' range, its low end divided and its high end multiplied by "
            f"{STATISTIC_MARGIN}",
            "validation_kept": self.validation_kept,
            **({"test_kept": test_kept} if test_kept is not None else {}),
        }


def serving_model(classifier: keras.Model) -> keras.Model:
    """The classifier with its pooled features as a second output, for the gate; unchanged without a pooling layer
    named ``pool`` (such models are served without a gate)."""
    try:
        pool = classifier.get_layer(POOLED_FEATURES_LAYER)
    except ValueError:
        logger.info("model %r has no %r layer: it is exported without an input gate", classifier.name, "pool")
        return classifier
    return keras.Model(classifier.inputs, [classifier.output, pool.output], name=f"{classifier.name}_served")


def fit_input_gate(
    fit_features: np.ndarray,
    fit_labels: np.ndarray,
    fit_pixels: np.ndarray,
    validation_features: np.ndarray,
    validation_pixels: np.ndarray,
    *,
    components: int = COMPONENTS,
) -> FittedGate:
    """Fit the class means, the probabilistic-PCA covariance and the statistic bounds on the fit films, set the
    distance threshold on the validation films, and check that the gate keeps them."""
    features = np.asarray(fit_features, dtype=np.float64)
    classes = np.unique(fit_labels)
    if len(features) <= len(classes) or len(validation_features) == 0:
        raise GateFitError("the gate needs fit films of every class and validation films")
    class_means = np.stack([features[fit_labels == label].mean(axis=0) for label in classes])
    centred = features - class_means[np.searchsorted(classes, fit_labels)]
    _, singular_values, directions = np.linalg.svd(centred, full_matrices=False)
    variances = np.zeros(features.shape[1])
    variances[: len(singular_values)] = singular_values**2 / (len(features) - len(classes))
    kept = max(1, min(components, int(np.sum(variances > 0)) - 1))
    floor = RESIDUAL_VARIANCE_FLOOR * float(variances.mean())
    residual_variance = max(float(variances[kept:].mean()), floor)
    statistics = image_statistics(fit_pixels)
    bounds = np.stack([statistics.min(axis=0) / STATISTIC_MARGIN, statistics.max(axis=0) * STATISTIC_MARGIN], axis=1)
    provisional = InputGate(
        class_means=class_means,
        components=directions[:kept],
        component_variances=np.maximum(variances[:kept], floor),
        residual_variance=residual_variance,
        distance_threshold=1.0,
        statistic_bounds=bounds,
    )
    largest = float(np.max(provisional.distances(validation_features)))
    gate = InputGate(
        class_means=provisional.class_means,
        components=provisional.components,
        component_variances=provisional.component_variances,
        residual_variance=provisional.residual_variance,
        distance_threshold=DISTANCE_MARGIN * largest,
        statistic_bounds=bounds,
    )
    gate.validate()
    validation_kept = kept_share(gate, validation_pixels, validation_features)
    if validation_kept < MINIMUM_VALIDATION_KEPT:
        raise GateFitError(
            f"the input gate keeps {validation_kept:.2%} of the validation films, below {MINIMUM_VALIDATION_KEPT:.1%}"
        )
    logger.info(
        "input gate: threshold %.4f, keeps %.2f%% of validation", gate.distance_threshold, 100 * validation_kept
    )
    return FittedGate(gate, len(features), validation_kept, largest)


def kept_share(gate: InputGate, pixels: np.ndarray, features: np.ndarray) -> float:
    """The share of images the gate accepts."""
    verdicts = gate.check(pixels, features)
    return sum(verdict.accepted for verdict in verdicts) / len(verdicts)
