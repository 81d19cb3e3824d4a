"""The film-condition head: can this film be read as it is, or is it partial, occluded, blurred, inverted or turned?

A small multinomial logistic regression on what the model already computes (its pooled penultimate features) and on
a few cheap statistics of the model input (the layout of brightness and detail on a coarse grid, contrast and
detail), fitted on synthetic variants of the training films (``training.screening``). Its classes are ``clean`` and
one class per condition; a film is clean unless the probability of ``clean`` falls below the head's threshold, and
then its condition is the likeliest other class. A film whose probabilities are not finite numbers is not judged.

The head travels with the model in its artifact (``screening.npz``, checked against the card's sha256): it is only
meaningful for the features of the model it was fitted on. The file holds plain arrays and is read with
``allow_pickle=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.input_gate import image_statistics

CLEAN = "clean"
"""The head's first class: a film the model can read."""

UNJUDGED = "unjudged"
"""The condition of a film whose probabilities are not finite numbers."""

GRID = 8
"""The coarse grid of the layout statistics: brightness and detail of each of ``GRID x GRID`` blocks."""

STATISTIC_COUNT = 2 * GRID * GRID + 5
"""How many image statistics follow the pooled features in the head's input."""

_MATRIX = 2
_EPSILON = 1e-3


class ConditionHeadError(ValueError):
    """A screening file that cannot be read, or does not fit the model's features."""


def condition_statistics(pixels: np.ndarray) -> np.ndarray:
    """``(n, STATISTIC_COUNT)`` statistics of a ``(n, size, size, 1)`` uint8 batch of model inputs.

    The film is standardised (its mean and standard deviation), cut into ``GRID x GRID`` blocks, and each block's
    mean and standard deviation are kept: where the bright and dark parts and the detail are, which tells an
    upright film from a turned, inverted, partial or covered one. Then the logarithms of the input gate's contrast,
    detail and fine detail, and of detail and fine detail relative to contrast, which fall for a blurred film."""
    count = len(pixels)
    block = pixels.shape[1] // GRID
    side = block * GRID
    blocks = pixels[:, :side, :side, 0].astype(np.float64).reshape(count, GRID, block, GRID, block)
    # Sums over each block's columns, then its rows: far cheaper than a reduction over two strided axes at once.
    sums = blocks.sum(axis=4).sum(axis=2).reshape(count, -1)
    squares = (blocks * blocks).sum(axis=4).sum(axis=2).reshape(count, -1)
    pixels_per_block = block * block
    block_means = sums / pixels_per_block
    block_variances = np.maximum(squares / pixels_per_block - block_means**2, 0.0)
    mean = block_means.mean(axis=1, keepdims=True)
    variance = np.maximum((squares.sum(axis=1, keepdims=True) / (side * side)) - mean**2, 0.0)
    spread = np.sqrt(variance) + _EPSILON
    standardised_means = (block_means - mean) / spread
    standardised_spreads = np.sqrt(block_variances) / spread
    gate = image_statistics(pixels).astype(np.float64)
    relative = gate[:, 1:] / (gate[:, :1] + _EPSILON)
    logs = np.log(np.concatenate([gate, relative], axis=1) + _EPSILON)
    return np.concatenate([standardised_means, standardised_spreads, logs], axis=1)


@dataclass(frozen=True)
class ConditionHead:
    """The fitted head: standardisation, weights and bias of a multinomial logistic regression, and its threshold."""

    classes: tuple[str, ...]
    """Class names in the order of the outputs; ``clean`` first."""
    input_mean: np.ndarray
    """``(inputs,)`` mean of each input (pooled features, then ``condition_statistics``) over the fitting films."""
    input_scale: np.ndarray
    """``(inputs,)`` standard deviation of each input over the fitting films (positive)."""
    weights: np.ndarray
    """``(inputs, classes)``."""
    bias: np.ndarray
    """``(classes,)``."""
    clean_threshold: float
    """A film is clean when the probability of ``clean`` is at least this."""

    @property
    def feature_count(self) -> int:
        """How many pooled features of the model the head reads."""
        return int(self.weights.shape[0]) - STATISTIC_COUNT

    def probabilities(self, pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
        """``(n, classes)`` class probabilities of a batch: its model input pixels and the model's pooled features."""
        features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        if features.shape[1] != self.feature_count:
            raise ConditionHeadError(
                f"the screening head expects {self.feature_count} features, the model gives {features.shape[1]}"
            )
        inputs = np.concatenate([features, condition_statistics(pixels)], axis=1)
        scores = ((inputs - self.input_mean) / self.input_scale) @ self.weights + self.bias
        scores -= scores.max(axis=1, keepdims=True)
        exponentials = np.exp(scores)
        result: np.ndarray = exponentials / exponentials.sum(axis=1, keepdims=True)
        return result

    def conditions(self, pixels: np.ndarray, features: np.ndarray) -> list[str]:
        """Each film's condition: ``clean``, the likeliest other class, or ``UNJUDGED``."""
        return [self.condition_of(row) for row in self.probabilities(pixels, features)]

    def condition_of(self, probabilities: np.ndarray) -> str:
        """The condition one row of ``probabilities`` stands for."""
        if not np.all(np.isfinite(probabilities)):
            return UNJUDGED
        if probabilities[0] >= self.clean_threshold:
            return CLEAN
        return self.classes[1 + int(np.argmax(probabilities[1:]))]

    def save(self, path: Path) -> None:
        """Write the head as plain arrays (no pickles) to ``path``."""
        with path.open("wb") as stream:
            np.savez(
                stream,
                classes=np.array(self.classes, dtype=str),
                input_mean=self.input_mean.astype(np.float64),
                input_scale=self.input_scale.astype(np.float64),
                weights=self.weights.astype(np.float64),
                bias=self.bias.astype(np.float64),
                clean_threshold=np.float64(self.clean_threshold),
            )

    @classmethod
    def load(cls, path: Path) -> ConditionHead:
        """Read a screening file, refusing pickled objects and arrays of the wrong shape."""
        try:
            with np.load(path, allow_pickle=False) as arrays:
                head = cls(
                    classes=tuple(str(name) for name in arrays["classes"]),
                    input_mean=np.asarray(arrays["input_mean"], dtype=np.float64),
                    input_scale=np.asarray(arrays["input_scale"], dtype=np.float64),
                    weights=np.asarray(arrays["weights"], dtype=np.float64),
                    bias=np.asarray(arrays["bias"], dtype=np.float64),
                    clean_threshold=float(arrays["clean_threshold"]),
                )
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise ConditionHeadError(f"cannot read the screening head {path.name}: {error}") from error
        head.validate()
        return head

    def validate(self) -> None:
        """Raise ``ConditionHeadError`` unless the arrays have consistent shapes and the values make sense."""
        if self.weights.ndim != _MATRIX:
            raise ConditionHeadError("the screening head's weights must be a matrix")
        inputs, classes = self.weights.shape
        if (
            len(self.classes) != classes
            or classes < _MATRIX
            or self.classes[0] != CLEAN
            or len(set(self.classes)) != classes
            or self.bias.shape != (classes,)
            or self.input_mean.shape != (inputs,)
            or self.input_scale.shape != (inputs,)
            or inputs <= STATISTIC_COUNT
        ):
            raise ConditionHeadError("the screening head's arrays have inconsistent shapes or classes")
        finite = all(
            np.all(np.isfinite(array)) for array in (self.input_mean, self.input_scale, self.weights, self.bias)
        )
        if not (finite and np.all(self.input_scale > 0) and 0.0 < self.clean_threshold < 1.0):
            raise ConditionHeadError(
                "the screening head's values must be finite, its scales positive, its threshold in (0, 1)"
            )
