"""The recipe search and the validation stress suite run on real films and never read the test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from core.preprocessing import decode, preprocess
from training.augment import AugmentationSettings, augment_film
from training.config import TrainingConfig
from training.data import list_split
from training.search import SEARCHED, SearchSettings, run_search
from training.stress import STRESS_VARIANTS, build_stress_set, stress_figures, variant_bytes


def test_every_stress_variant_is_a_readable_file(sample_paths: list[Path]) -> None:
    """Each variant of a real film decodes through the shared preprocessing, and the same seed gives the same file."""
    data = sample_paths[0].read_bytes()
    for variant in STRESS_VARIANTS:
        built = variant_bytes(data, variant, seed=3)
        assert built == variant_bytes(data, variant, seed=3)
        assert preprocess(built, 96).pixels.shape == (96, 96, 1)
    cropped = decode(variant_bytes(data, "crop_15", seed=3))
    assert cropped.original_width < decode(data).original_width


def test_stress_figures_compare_with_the_truth_and_the_clean_call() -> None:
    """Sensitivity and specificity come from the labels, agreement from the clean logits' signs."""
    labels = np.array([1, 1, 0, 0])
    figures = stress_figures(labels, np.array([2.0, 1.0, -1.0, -2.0]), np.array([2.0, -1.0, -1.0, 1.0]))
    assert (figures.sensitivity, figures.specificity, figures.same_call) == (0.5, 0.5, 0.5)


def test_augmentation_keeps_the_film_shape_and_range(sample_paths: list[Path]) -> None:
    """An augmented film is still a (size, size, 1) uint8 film, and strength 0 leaves it untouched."""
    film = tf.constant(preprocess(sample_paths[0].read_bytes(), 64).pixels)
    tf.random.set_seed(0)
    for _ in range(5):
        augmented = augment_film(film, AugmentationSettings(1.0))
        assert augmented.shape == (64, 64, 1) and augmented.dtype == tf.uint8
    assert np.array_equal(augment_film(film, AugmentationSettings(0.0)).numpy(), film.numpy())
    with pytest.raises(ValueError, match="strength"):
        AugmentationSettings(1.5)


@pytest.mark.slow
def test_search_trains_trials_and_reports_the_winner(data_root: Path, tmp_path: Path) -> None:
    """Two tiny trials on real films: each is judged on validation and its stress suite, and the winner's values
    are written with the trials."""
    base = TrainingConfig(limit_per_class=16, head_epochs=1, batch_size=8)
    report = run_search(
        data_root / "train", base, SearchSettings(trials=2, minutes=10, image_size=64, epochs=1), tmp_path
    )
    assert len(report.trials) == 2
    assert set(report.best) == set(SEARCHED)
    for trial in report.trials:
        assert 0.0 <= trial.objective <= 1.0
        assert trial.worst_variant in STRESS_VARIANTS
    written = json.loads((tmp_path / "search.json").read_text())
    assert written["best"] == report.best
    assert "| trial |" in (tmp_path / "search.md").read_text()


def test_the_stress_suite_is_built_from_the_files_given(data_root: Path) -> None:
    """Every variant holds one image per film, aligned with the films' labels."""
    files = [f for f in list_split(data_root / "train") if f.label == 0][:2]
    files += [f for f in list_split(data_root / "train") if f.label == 1][:2]
    stress = build_stress_set(files, 64)
    assert list(stress.labels) == [0, 0, 1, 1]
    assert all(images.shape == (4, 64, 64, 1) for images in stress.variants.values())
