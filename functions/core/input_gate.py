"""The input gate: is this upload a chest radiograph the model can read, or something it must refuse?

A classifier trained on two classes of chest X-rays answers PNEUMONIA or NORMAL for anything, often with high
confidence: a blank frame, noise, a photograph. The gate refuses such inputs before a verdict is written, from two
kinds of evidence that cost almost nothing next to the model:

- **Image statistics** of the model's input (its contrast and its amount of detail at two scales). Their ranges are
  those of the training X-rays, widened by a factor of two on each side. Blank, constant and smooth gradient
  images fall below them; pixel noise and fine patterns rise above them.
- **Distance to the training X-rays** of the model's own pooled penultimate features. The features of the training
  films of each class are modelled as a Gaussian with a shared covariance, approximated by probabilistic PCA (the
  leading components, and one variance for the rest); the distance of an upload is its Mahalanobis distance to the
  nearer class mean, per feature dimension. The threshold is set on validation films, never on the test split.

The statistics travel with the model in its artifact (``input_gate.npz``, checked against the card's sha256): a
gate is only meaningful for the features of the model it was fitted on. The file holds plain arrays and is read
with ``allow_pickle=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

STATISTIC_NAMES = ("contrast", "detail", "fine_detail")
"""The image statistics, in the order of the gate's bounds."""

BLANK_OR_SMOOTH = "the image has too little contrast or detail for a radiograph (blank, constant or a gradient)"
NOISE_OR_PATTERN = "the image has more fine detail than a radiograph (noise, a pattern or a photograph of texture)"
UNLIKE_TRAINING = "the image does not resemble the chest radiographs the model was trained on"

_MATRIX = 2


class InputGateError(ValueError):
    """A gate file that cannot be read, or does not fit the model's features."""


def image_statistics(pixels: np.ndarray) -> np.ndarray:
    """``(n, 3)`` statistics of a ``(n, size, size, 1)`` uint8 batch of model inputs.

    Contrast is the standard deviation of the pixels; detail is the mean absolute difference of neighbouring pixels;
    fine detail is the mean absolute value of the discrete Laplacian. All are in grey levels of 0-255."""
    images = pixels.reshape(len(pixels), pixels.shape[1], pixels.shape[2]).astype(np.float32)
    contrast = images.std(axis=(1, 2))
    detail = (np.abs(np.diff(images, axis=2)).mean(axis=(1, 2)) + np.abs(np.diff(images, axis=1)).mean(axis=(1, 2))) / 2
    centre = images[:, 1:-1, 1:-1]
    laplacian = 4 * centre - images[:, :-2, 1:-1] - images[:, 2:, 1:-1] - images[:, 1:-1, :-2] - images[:, 1:-1, 2:]
    fine_detail = np.abs(laplacian).mean(axis=(1, 2))
    return np.stack([contrast, detail, fine_detail], axis=1)


@dataclass(frozen=True)
class GateVerdict:
    """The gate's view of one image: refused with a fixed reason, or accepted; and the feature distance."""

    distance: float
    refusal: str | None
    """A fixed text saying why the image is refused; None when it is accepted."""

    @property
    def accepted(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class InputGate:
    """The fitted statistics of the gate: class means, principal components and bounds."""

    class_means: np.ndarray
    """``(classes, features)`` mean pooled features of the training films of each class."""
    components: np.ndarray
    """``(k, features)`` leading principal directions of the within-class scatter, orthonormal rows."""
    component_variances: np.ndarray
    """``(k,)`` variance of the training films along each component."""
    residual_variance: float
    """Mean variance of the training films in every direction outside the components."""
    distance_threshold: float
    """Largest accepted distance."""
    statistic_bounds: np.ndarray
    """``(3, 2)`` lowest and highest accepted value of each image statistic, in ``STATISTIC_NAMES`` order."""

    @property
    def feature_count(self) -> int:
        return int(self.class_means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` Mahalanobis distance per feature dimension of ``(n, features)`` pooled features to the nearer
        class mean, under the probabilistic-PCA covariance."""
        features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        if features.shape[1] != self.feature_count:
            raise InputGateError(f"the gate expects {self.feature_count} features, the model gives {features.shape[1]}")
        squared = []
        for mean in self.class_means:
            centred = features - mean
            projected = centred @ self.components.T
            residual = np.maximum((centred * centred).sum(axis=1) - (projected * projected).sum(axis=1), 0.0)
            squared.append((projected**2 / self.component_variances).sum(axis=1) + residual / self.residual_variance)
        result: np.ndarray = np.sqrt(np.min(squared, axis=0) / self.feature_count)
        return result

    def check(self, pixels: np.ndarray, features: np.ndarray) -> list[GateVerdict]:
        """The verdict on each image of a batch: its model input pixels and the model's pooled features of it."""
        statistics = image_statistics(pixels)
        verdicts = []
        for distance, values in zip(self.distances(features), statistics, strict=True):
            refusal = None
            if np.any(values < self.statistic_bounds[:, 0]):
                refusal = BLANK_OR_SMOOTH
            elif np.any(values > self.statistic_bounds[:, 1]):
                refusal = NOISE_OR_PATTERN
            elif not distance <= self.distance_threshold:  # A NaN distance is refused too.
                refusal = UNLIKE_TRAINING
            verdicts.append(GateVerdict(distance=float(distance), refusal=refusal))
        return verdicts

    def save(self, path: Path) -> None:
        """Write the gate as plain arrays (no pickles) to ``path``."""
        with path.open("wb") as stream:
            np.savez(
                stream,
                class_means=self.class_means.astype(np.float32),
                components=self.components.astype(np.float32),
                component_variances=self.component_variances.astype(np.float64),
                residual_variance=np.float64(self.residual_variance),
                distance_threshold=np.float64(self.distance_threshold),
                statistic_bounds=self.statistic_bounds.astype(np.float64),
            )

    @classmethod
    def load(cls, path: Path) -> InputGate:
        """Read a gate file, refusing pickled objects and arrays of the wrong shape."""
        try:
            with np.load(path, allow_pickle=False) as arrays:
                gate = cls(
                    class_means=np.asarray(arrays["class_means"], dtype=np.float64),
                    components=np.asarray(arrays["components"], dtype=np.float64),
                    component_variances=np.asarray(arrays["component_variances"], dtype=np.float64),
                    residual_variance=float(arrays["residual_variance"]),
                    distance_threshold=float(arrays["distance_threshold"]),
                    statistic_bounds=np.asarray(arrays["statistic_bounds"], dtype=np.float64),
                )
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise InputGateError(f"cannot read the input gate {path.name}: {error}") from error
        gate.validate()
        return gate

    def validate(self) -> None:
        """Raise ``InputGateError`` unless the arrays have consistent shapes and positive variances."""
        if self.class_means.ndim != _MATRIX or self.components.ndim != _MATRIX:
            raise InputGateError("the input gate's class means and components must both be matrices")
        classes, features = self.class_means.shape
        k = len(self.component_variances)
        if (
            classes < 1
            or self.components.shape != (k, features)
            or self.component_variances.shape != (k,)
            or self.statistic_bounds.shape != (len(STATISTIC_NAMES), 2)
        ):
            raise InputGateError("the input gate's arrays have inconsistent shapes")
        if not (np.all(self.component_variances > 0) and self.residual_variance > 0 and self.distance_threshold > 0):
            raise InputGateError("the input gate's variances and threshold must be positive")
