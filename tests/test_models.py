"""Every architecture maps a uint8 grayscale batch to one logit per image; augmentation never flips."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from training.augment import AugmentationSettings, augment_film
from training.models import ARCHITECTURES, build_classifier, build_ensemble

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES if a != "efficientnet"])
def test_architecture_outputs_one_logit_per_image(architecture: str) -> None:
    """The classifier takes the shared preprocessing's uint8 output as it is."""
    model = build_classifier(architecture, size=64)
    batch = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 1), dtype=np.uint8)
    assert model.predict(batch, verbose=0).shape == (3, 1)


def test_efficientnet_builds_without_downloaded_weights() -> None:
    """The transfer-learning backbone builds offline when no weights are asked for."""
    model = build_classifier("efficientnet", size=64, weights=None)
    assert model.output_shape == (None, 1)


def test_standardization_makes_the_model_exposure_invariant() -> None:
    """Brightening and contrast-stretching a film does not change the compact model's output."""
    model = build_classifier("compact", size=64)
    film = np.random.default_rng(1).integers(40, 120, (1, 64, 64, 1)).astype(np.uint8)
    brighter = film * 2 + 10  # An exact linear change of exposure, still inside 0-255.
    assert model.predict(film, verbose=0) == pytest.approx(model.predict(brighter, verbose=0), abs=1e-3)


def test_ensemble_averages_member_logits() -> None:
    """The served ensemble's logit is the mean of its members' logits."""
    members = [build_classifier("compact", size=64) for _ in range(2)]
    batch = np.random.default_rng(2).integers(0, 256, (4, 64, 64, 1), dtype=np.uint8)
    expected = np.mean([m.predict(batch, verbose=0) for m in members], axis=0)
    assert build_ensemble(members).predict(batch, verbose=0) == pytest.approx(expected, abs=1e-5)


def test_augmentation_never_mirrors_a_film() -> None:
    """No augmentation flips a film: a ramp dark on the left stays darker on the left, whatever the draw."""
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (64, 1)).round().astype(np.uint8)[..., None]
    tf.random.set_seed(3)
    for _ in range(40):
        augmented = augment_film(tf.constant(ramp), AugmentationSettings(1.0)).numpy().astype(float)
        assert augmented[:, :32].mean() < augmented[:, 32:].mean()
