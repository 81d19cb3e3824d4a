"""WiSE-FT: the served weights as a point on the line from a network's weights before fine-tuning to after.

Fine-tuning a pretrained backbone on one data set's films fits it to that data set, features included; the
weights before fine-tuning (the pretrained backbone with a head trained on its frozen features) are a weaker fit
there but keep the pretrained features. Wortsman et al. (2022, "Robust fine-tuning of zero-shot models") found that
the average of the two sets of weights, taken element by element, keeps most of the fine-tuned network's accuracy
on its own distribution and is more accurate than either end under distribution shift. Both ends must share their
batch-norm statistics (the backbone's are frozen during fine-tuning, ``training.train.freeze_batch_norm``), so
their average is a network of the same kind.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from training.config import HyperparameterError


def interpolate_weights(
    before: list[np.ndarray], fine_tuned: list[np.ndarray], fine_tuned_share: float
) -> list[np.ndarray]:
    """Each weight ``(1 - fine_tuned_share) * before + fine_tuned_share * fine_tuned``; the lists must match."""
    if not 0.0 <= fine_tuned_share <= 1.0:
        raise ValueError(f"the fine-tuned share must be in [0, 1], got {fine_tuned_share}")
    if not same_network(before, fine_tuned):
        raise ValueError("the two networks' weights differ in number or shape: they are not the same network")
    return [
        ((1.0 - fine_tuned_share) * a + fine_tuned_share * b).astype(a.dtype)
        for a, b in zip(before, fine_tuned, strict=True)
    ]


def same_network(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    """Whether two weight lists could be the same network's: as many weights, each of the same shape."""
    return len(first) == len(second) and all(a.shape == b.shape for a, b in zip(first, second, strict=True))


def fine_tuned_weights(classifier: keras.Model, path: Path) -> list[np.ndarray]:
    """The weights of the Keras model saved at ``path``, checked to be ``classifier``'s kind of network."""
    saved = keras.saving.load_model(path, compile=False)
    weights: list[np.ndarray] = saved.get_weights()
    if not same_network(weights, classifier.get_weights()):
        raise HyperparameterError(f"{path} is not a network of this recipe's architecture and input size")
    return weights
