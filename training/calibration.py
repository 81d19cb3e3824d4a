"""Temperature scaling and the operating-point rule, both fitted on validation data only.

The rule, written down before any test figure of a model that uses it was seen:

- the *screening point* is the highest validation threshold whose sensitivity is at least ``TARGET_SENSITIVITY``;
- a film is NORMAL when P(pneumonia) is below ``min(screening point, 0.5)``, PNEUMONIA when it is at least
  ``max(screening point, 0.5)``, and INDETERMINATE (refer to a reader) in between.

So a stated label is always the likelier class (its confidence is at least 0.5) and the screening point still
decides what is flagged: INDETERMINATE counts as flagged in every screening figure.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit
from sklearn.metrics import roc_curve

from core.labels import OperatingPoints

TARGET_SENSITIVITY = 0.97
"""The screening rule: the decision threshold keeps at least this share of validation pneumonia cases."""


def sigmoid(logits: np.ndarray, temperature: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Calibrated PNEUMONIA probability of each logit: ``sigmoid(logit / temperature + intercept)``."""
    return np.asarray(expit(np.asarray(logits, dtype=np.float64) / temperature + intercept))


def binary_log_loss(labels: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under ``sigmoid(logits / temperature)``."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return float(-np.mean(labels * log_expit(scaled) + (1 - labels) * log_expit(-scaled)))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature that minimises validation log loss (Guo et al., 2017), searched over [0.05, 20]."""
    result = minimize_scalar(
        lambda log_t: binary_log_loss(labels, logits, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(result.x))


def choose_threshold(
    labels: np.ndarray, probabilities: np.ndarray, target_sensitivity: float = TARGET_SENSITIVITY
) -> float:
    """The highest threshold whose sensitivity on these (validation) cases is at least ``target_sensitivity``.

    This is the usual screening operating point: missing pneumonia is the costlier error, so sensitivity is
    held at the target and, subject to that, specificity is made as high as the validation data allows.
    A case is called PNEUMONIA when its probability is greater than or equal to the threshold."""
    false_positive_rate, true_positive_rate, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    eligible = np.flatnonzero(true_positive_rate >= target_sensitivity)
    # roc_curve orders thresholds from high to low, so the first eligible point has the fewest false positives.
    del false_positive_rate
    return float(min(thresholds[eligible[0]], 1.0))


OPERATING_POINT_RULE = (
    f"screening point = highest validation threshold with sensitivity >= {TARGET_SENSITIVITY}; "
    "NORMAL below min(screening point, 0.5), PNEUMONIA from max(screening point, 0.5), INDETERMINATE between"
)


def choose_operating_points(
    labels: np.ndarray, probabilities: np.ndarray, target_sensitivity: float = TARGET_SENSITIVITY
) -> OperatingPoints:
    """The two operating points of the module's rule, from calibrated (validation) probabilities."""
    return OperatingPoints.around(choose_threshold(labels, probabilities, target_sensitivity))
