"""Quantization-aware fine-tuning: batch norms folded exactly, kernels on the int8 grid, activations quantized to
calibrated ranges, and fine-tuning that brings the quantized copy closer to the float model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import layers

from core.labels import OperatingPoints
from training.data import list_split, load_images
from training.export import ParityCheck, quantization_aware_candidate, representative_films
from training.gate import serving_model
from training.quantization_aware import (
    FineTuneSettings,
    FoldedBatchNorm,
    calibrate_output_ranges,
    fine_tune,
    fold,
    logit_weights,
    on_grid_copy,
    quantization_aware_copy,
    quantized_outputs,
)

SIZE = 24


def small_network(seed: int = 0) -> keras.Model:
    """A tiny network of the served kind: uint8 film in, convolutions with batch norms, a residual, pooled features
    named ``pool``, one logit; batch-norm statistics away from the identity, so folding them matters."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(SIZE, SIZE, 1), dtype="uint8")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)(keras.ops.cast(inputs, "float32"))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    shortcut = x
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="depthwise_bn")(x)
    x = layers.ReLU(6.0, name="depthwise_relu")(x)
    x = layers.Conv2D(8, 1, use_bias=False, name="project_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="project_bn")(x)
    x = layers.Add(name="residual")([shortcut, x])
    pooled = layers.GlobalAveragePooling2D(name="pool")(x)
    logit = layers.Dense(1, name="pneumonia_logit")(layers.Dropout(0.3)(pooled))
    model = keras.Model(inputs, logit)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 2.0, channels),
                rng.normal(0.0, 0.3, channels),
                rng.normal(0.0, 0.5, channels),
                rng.uniform(0.2, 3.0, channels),
            ])  # fmt: skip
    return model


def films(count: int, seed: int) -> np.ndarray:
    """Smooth random uint8 images (a blurred field plus a little noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, (count, SIZE // 4, SIZE // 4, 1))
    smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)


def logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(images, training=False)).reshape(-1)


def test_folding_a_batch_norm_gives_the_same_outputs() -> None:
    """A convolution with its batch norm folded in computes what the convolution and the batch norm computed."""
    model = small_network()
    images = films(4, seed=1)
    before = keras.Model(model.input, model.get_layer("stem_bn").output)(images, training=False)
    kernel, bias = fold(model.get_layer("stem_conv").get_weights()[0], model.get_layer("stem_bn"), channel_axis=-1)
    normalized = keras.Model(model.input, model.get_layer("stem_conv").input)(images)
    after = keras.ops.conv(normalized, kernel, strides=2, padding="same") + bias
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-4)


def test_on_grid_kernels_are_int8_levels_of_one_scale_per_channel() -> None:
    """Every kernel of the exported copy is an integer multiple (at most 127) of its channel's scale, and the
    largest of each channel is exactly 127 of them: the converter's weight quantization of it is lossless."""
    plain = on_grid_copy(quantization_aware_copy(small_network()))
    for name, axis in (("stem_conv", -1), ("depthwise_conv", 2), ("project_conv", -1), ("pneumonia_logit", -1)):
        kernel = plain.get_layer(name).get_weights()[0]
        moved = np.moveaxis(kernel, axis, -1).reshape(-1, kernel.shape[axis])
        levels = moved / (np.abs(moved).max(axis=0) / 127.0)
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        np.testing.assert_allclose(np.abs(levels).max(axis=0), 127.0, atol=1e-3)


def test_the_exported_copy_answers_as_the_quantized_copy_and_near_the_float_model() -> None:
    """Without activation ranges, the plain copy with on-grid kernels gives the quantization-aware copy's logits,
    which differ from the float model's by the weights' rounding only (a little, not nothing)."""
    model = small_network()
    quantized = quantization_aware_copy(model)
    images = films(16, seed=2)
    plain = logits(on_grid_copy(quantized), images)
    np.testing.assert_allclose(plain, logits(quantized, images), atol=1e-4)
    difference = np.abs(plain - logits(model, images))
    assert 0 < difference.max() < 0.05 * np.abs(logits(model, images)).max() + 0.05


def test_a_convolution_without_bias_or_batch_norm_gets_a_zero_bias() -> None:
    """A convolution with neither a bias nor a batch norm after it is copied with a zero bias, so its quantized copy
    answers as it does up to the kernel's rounding."""
    keras.utils.set_random_seed(9)
    inputs = keras.Input(shape=(SIZE, SIZE, 1), dtype="uint8")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)(keras.ops.cast(inputs, "float32"))
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="bare_conv")(x)
    pooled = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(1, name="pneumonia_logit")(pooled))
    quantized = quantization_aware_copy(model)
    np.testing.assert_array_equal(quantized.get_layer("bare_conv").bias.numpy(), np.zeros(4, dtype=np.float32))
    images = films(8, seed=10)
    np.testing.assert_allclose(logits(quantized, images), logits(model, images), atol=0.05)


def test_activation_ranges_are_those_the_converter_quantizes() -> None:
    """Ranges go to each convolution's output after its fused ReLU (not before it), the project convolution's
    folded batch norm, the residual sum, the pooled features and the logit; each holds 0 and the outputs seen."""
    quantized = quantization_aware_copy(small_network())
    calibrate_output_ranges(quantized, films(8, seed=3))
    names = {layer.name for layer in quantized_outputs(quantized)}
    assert names == {"stem_relu", "depthwise_relu", "project_bn", "residual", "pool", "pneumonia_logit"}
    assert isinstance(quantized.get_layer("project_bn"), FoldedBatchNorm)
    for layer in quantized_outputs(quantized):
        low, high = layer.output_range.numpy()
        assert low <= 0.0 <= high and high > low


def test_quantized_activations_move_the_logits_more_than_the_weights_alone() -> None:
    """With calibrated ranges the copy's logits carry the activations' rounding too."""
    model = small_network()
    quantized = quantization_aware_copy(model)
    images = films(16, seed=4)
    weights_only = np.abs(logits(quantized, images) - logits(model, images)).mean()
    calibrate_output_ranges(quantized, images)
    both = np.abs(logits(quantized, images) - logits(model, images)).mean()
    assert both > weights_only


@pytest.mark.parametrize("activations", [False, True])
def test_fine_tuning_brings_the_quantized_copy_closer_to_the_float_model(activations: bool) -> None:
    """A few epochs of fine-tuning on training films cut the quantized copy's logit error on other films."""
    model = small_network(seed=5)
    quantized = quantization_aware_copy(model)
    training, held_out = films(256, seed=6), films(64, seed=7)
    representative: Any = training[:64] if activations else None
    if representative is not None:
        calibrate_output_ranges(quantized, representative)
    before = np.abs(logits(quantized, held_out) - logits(model, held_out)).mean()
    losses = fine_tune(
        model,
        quantized,
        training,
        temperature=1.0,
        settings=FineTuneSettings(epochs=6, batch_size=16, learning_rate=1e-3, weights_only_epochs=0),
        representative=representative,
    )
    after = np.abs(logits(quantized, held_out) - logits(model, held_out)).mean()
    assert losses[-1] < losses[0]
    assert after < 0.7 * before


def test_weights_only_epochs_come_first_with_the_activations_unquantized() -> None:
    """Weights-only epochs train with every activation range empty (only the kernels quantized) and cut the error;
    the epochs after them quantize the activations to calibrated ranges; one loss is returned per epoch."""
    model = small_network(seed=11)
    quantized = quantization_aware_copy(model)
    training, held_out = films(256, seed=12), films(64, seed=13)
    calibrate_output_ranges(quantized, training[:64])
    before = np.abs(logits(quantized, held_out) - logits(model, held_out)).mean()
    settings = FineTuneSettings(
        epochs=0, batch_size=16, weights_only_epochs=4, weights_only_films=128, weights_only_learning_rate=1e-3
    )
    losses = fine_tune(model, quantized, training, temperature=1.0, settings=settings, representative=training[:64])
    assert len(losses) == 4
    assert all(not layer.output_range.numpy().any() for layer in quantized_outputs(quantized))
    assert np.abs(logits(quantized, held_out) - logits(model, held_out)).mean() < 0.7 * before
    both = fine_tune(
        model,
        quantized,
        training,
        temperature=1.0,
        settings=FineTuneSettings(epochs=1, batch_size=16, weights_only_epochs=1, weights_only_films=32),
        representative=training[:64],
    )
    assert len(both) == 2
    assert all(np.ptp(layer.output_range.numpy()) > 0 for layer in quantized_outputs(quantized))


def test_the_exporter_gates_a_quantization_aware_candidate_against_the_float_model(data_root: Path) -> None:
    """The exporter's quantization-aware candidate is a real int8 LiteRT model, measured against the float Keras
    model's probabilities on validation films and named by how it was made."""
    files = list_split(data_root / "train")
    fit_files = files[:: max(1, len(files) // 48)][:48]
    validation = load_images(files[1 :: max(1, len(files) // 24)][:24], size=SIZE)
    model = small_network(seed=8)
    probabilities = 1 / (1 + np.exp(-logits(model, validation.images)))
    check = ParityCheck(validation, probabilities, 1.0, OperatingPoints(normal_below=0.5, pneumonia_from=0.5))
    candidate, model_bytes = quantization_aware_candidate(
        model,
        FineTuneSettings(epochs=1, batch_size=16, weights_only_epochs=1, weights_only_films=16),
        fit_files=fit_files,
        representative=representative_films(fit_files, SIZE, count=16),
        check=check,
        seed=0,
    )
    assert candidate.quantization == "int8"
    method = "quantization-aware fine-tuning, 1 weights-only epoch, then 1 epoch with activations"
    assert candidate.method == method
    assert candidate.name == f"int8 ({method})"
    assert model_bytes[4:8] == b"TFL3"
    assert np.isfinite(candidate.max_probability_difference)
    assert candidate.size_bytes == len(model_bytes)


def test_logit_weights_follow_how_far_a_logit_error_moves_the_probability() -> None:
    """Weighted by probability sensitivity, a film at P = 0.5 weighs 1, a confident film weighs the floor, and the
    calibration's temperature and intercept decide where P = 0.5 lies; without a floor every film weighs 1."""
    logits = np.array([[3.0], [0.0], [40.0], [-40.0]], dtype=np.float32)
    weights = logit_weights(logits, temperature=2.0, intercept=-1.5, floor=0.05)
    assert weights.shape == logits.shape
    assert weights[0, 0] == pytest.approx(1.0)
    assert weights[1, 0] == pytest.approx(4 * 0.1824255 * 0.8175745, rel=1e-5)
    assert weights[2, 0] == weights[3, 0] == pytest.approx(0.05)
    assert np.all(logit_weights(logits, 2.0, -1.5, None) == 1.0)


def test_fine_tuning_loss_weights_each_film_by_its_probability_sensitivity() -> None:
    """With a sensitivity floor, the logit term of the fine-tuning loss is each film's squared logit difference
    weighted by ``logit_weights`` of the float model's calibrated probability, not a plain mean."""
    model = small_network(seed=5)
    training = films(64, seed=6)
    float_logits = logits(model, training)
    temperature = 0.01
    # The intercept puts P = 0.5 at the middle of the films' logits, so their weights span the floor to 1.
    intercept = -float(np.median(float_logits)) / temperature
    quantized_logits = logits(quantization_aware_copy(model), training)
    squared = np.square((quantized_logits - float_logits) / temperature)
    weights = logit_weights(float_logits, temperature, intercept, 0.01)
    assert weights.min() < 0.1
    assert weights.max() > 0.9
    for floor, expected in ((None, squared.mean()), (0.01, (weights * squared).mean())):
        # One batch of every film at a learning rate of 0: the loss of the unchanged copy, logits only.
        settings = FineTuneSettings(
            epochs=1,
            batch_size=64,
            learning_rate=0.0,
            weights_only_epochs=0,
            feature_weight=0.0,
            sensitivity_floor=floor,
        )
        losses = fine_tune(
            model,
            quantization_aware_copy(model),
            training,
            temperature=temperature,
            intercept=intercept,
            settings=settings,
        )
        assert losses[0] == pytest.approx(float(expected), rel=1e-3)


def test_parity_is_measured_with_the_calibration_intercept(data_root: Path) -> None:
    """A site-calibrated model's exported probabilities include its intercept: the float32 conversion agrees with
    Keras probabilities computed with it, and the gate sees the difference when they are computed without it."""
    files = list_split(data_root / "train")
    validation = load_images(files[:: max(1, len(files) // 16)][:16], size=SIZE)
    model = small_network(seed=8)
    validation_logits = logits(model, validation.images)
    points = OperatingPoints(normal_below=0.5, pneumonia_from=0.5)
    with_intercept = 1 / (1 + np.exp(-(validation_logits / 2.0 + 1.5)))
    check = ParityCheck(validation, with_intercept, 2.0, points, intercept=1.5)
    candidate, _ = check.convert_and_measure(serving_model(model), "float32", validation.images[:0], ())
    assert candidate.max_probability_difference < 1e-4
    without = replace(check, intercept=0.0)
    candidate, _ = without.convert_and_measure(serving_model(model), "float32", validation.images[:0], ())
    assert candidate.max_probability_difference > 0.05
