"""WiSE-FT: the served weights on the line between a network before and after fine-tuning, and the training job's
use of a fine-tuned teacher saved earlier."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from training.config import TrainingConfig
from training.data import limit_per_class, list_split, patient_level_split
from training.models import build_classifier
from training.train import SplitFiles, decode_splits, train_teacher
from training.weight_interpolation import fine_tuned_weights, interpolate_weights


def test_interpolation_runs_from_the_weights_before_to_the_fine_tuned_ones() -> None:
    """A share of 0 gives the weights before fine-tuning, 1 the fine-tuned ones, 0.5 their element-wise mean, each
    in the weights' own dtype."""
    before = [np.zeros((2, 3), dtype=np.float32), np.full(4, 2.0, dtype=np.float32)]
    after = [np.ones((2, 3), dtype=np.float32), np.full(4, 4.0, dtype=np.float32)]
    for share, expected in ((0.0, before), (1.0, after), (0.5, [np.full((2, 3), 0.5), np.full(4, 3.0)])):
        mixed = interpolate_weights(before, after, share)
        assert all(m.dtype == np.float32 for m in mixed)
        assert all(np.array_equal(m, e) for m, e in zip(mixed, expected, strict=True))


def test_interpolation_refuses_networks_of_another_shape_or_a_share_outside_zero_to_one() -> None:
    """Weights that differ in number or shape are not the same network, and a share outside [0, 1] extrapolates."""
    weights = [np.zeros((2, 3), dtype=np.float32)]
    with pytest.raises(ValueError, match="not the same network"):
        interpolate_weights(weights, [np.zeros((3, 2), dtype=np.float32)], 0.5)
    with pytest.raises(ValueError, match="not the same network"):
        interpolate_weights(weights, [*weights, *weights], 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        interpolate_weights(weights, weights, 1.5)


def test_fine_tuned_weights_must_be_a_network_of_the_same_recipe(tmp_path: Path) -> None:
    """A saved network of the same architecture and size gives its weights; one of another size is refused."""
    saved = build_classifier("compact", 32)
    path = tmp_path / "fine-tuned.keras"
    saved.save(path)
    loaded = fine_tuned_weights(build_classifier("compact", 32), path)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, saved.get_weights(), strict=True))
    with pytest.raises(ValueError, match="not a network of this recipe"):
        fine_tuned_weights(build_classifier("cnn", 32), path)


def test_config_checks_the_interpolation_and_the_reused_teacher(tmp_path: Path) -> None:
    """The share must lie in [0, 1], a reused fine-tuned teacher needs one pretrained teacher and an existing file,
    and both come from SageMaker-style strings."""
    with pytest.raises(ValueError, match="weight_interpolation"):
        TrainingConfig(weight_interpolation=1.2)
    with pytest.raises(ValueError, match="fine_tuned_model needs one pretrained teacher"):
        TrainingConfig(fine_tuned_model="teacher.keras", ensemble_size=2)
    with pytest.raises(FileNotFoundError, match="no fine-tuned model file"):
        TrainingConfig(fine_tuned_model=str(tmp_path / "missing.keras"))
    teacher = tmp_path / "teacher.keras"
    teacher.write_bytes(b"")
    config = TrainingConfig().with_overrides({"weight_interpolation": "0.5", "fine_tuned_model": str(teacher)})
    assert (config.weight_interpolation, config.fine_tuned_model) == (0.5, str(teacher))


def test_teacher_serves_the_mean_of_the_pretrained_and_the_reused_fine_tuned_weights(
    data_root: Path, tmp_path: Path
) -> None:
    """With a reused fine-tuned teacher and a share of 0.5, the job does not fine-tune: every backbone weight it
    serves is the mean of the ImageNet weight and the saved teacher's (the warm-up changes only the head)."""
    size = 64
    pretrained = build_classifier("efficientnet", size, 0.3, "imagenet")
    # A stand-in for a fine-tuned teacher: the pretrained network with every convolution and dense kernel moved.
    rng = np.random.default_rng(0)
    fine_tuned = build_classifier("efficientnet", size, 0.3, "imagenet")
    for layer in fine_tuned.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            kernel.assign(np.asarray(kernel) + rng.normal(0, 0.01, kernel.shape).astype(np.float32))
    path = tmp_path / "fine-tuned.keras"
    fine_tuned.save(path)
    config = TrainingConfig(
        image_size=size,
        head_epochs=1,
        batch_size=16,
        quantization="float32",
        student_architecture=None,
        weight_interpolation=0.5,
        fine_tuned_model=str(path),
        bootstrap_resamples=10,
    )
    files = limit_per_class(list_split(data_root / "train"), 24)
    fit, validation = patient_level_split(files, 0.25, config.seed)
    test = limit_per_class(list_split(data_root / "test"), 2)
    splits = decode_splits(SplitFiles(fit=fit, validation=validation, test=test), size)
    teacher = train_teacher(splits, config)
    stem = next(layer.name for layer in pretrained.layers if layer.name.endswith("stem_conv"))
    expected = 0.5 * np.asarray(pretrained.get_layer(stem).kernel) + 0.5 * np.asarray(fine_tuned.get_layer(stem).kernel)
    np.testing.assert_allclose(np.asarray(teacher.classifier.get_layer(stem).kernel), expected, rtol=1e-6, atol=1e-7)
    assert len(teacher.histories) == 1  # The head's warm-up only: nothing was fine-tuned.
    keras.backend.clear_session()
