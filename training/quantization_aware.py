"""Quantization-aware fine-tuning: a float model's weights moved onto the int8 grid, trained to answer as it does.

Post-training int8 rounds every weight of every block by up to half a quantization step, and EfficientNet-Lite0's
errors add up through its sixteen blocks to logits about 0.3 off (``README``: int8 serving). Here the network is
first rewritten as the converter will run it, each batch normalisation folded into the convolution before it, and
then fine-tuned with every kernel quantized as LiteRT quantizes it (symmetric int8, one scale per output channel;
straight-through gradients to a float copy of the weights) and every activation LiteRT stores as int8 quantized to
a range calibrated on the converter's representative films. It is distilled from the float model: its logit (over
the calibration temperature) and its pooled features (which the input gate and the screening head read) are the
targets. The result is exported with kernels exactly on the grid, so the converter's own weight quantization is
lossless and only the activations' ranges remain to calibrate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from training.calibration import sigmoid
from training.gate import POOLED_FEATURES_LAYER

logger = logging.getLogger(__name__)

INT8_LEVELS = 127.0
"""Symmetric int8 weights take the values -127..127 times their channel's scale (LiteRT's weight quantization)."""


def fake_quantize(kernel: Any, channel_axis: int) -> Any:
    """``kernel`` rounded to symmetric int8 with one scale per index of ``channel_axis`` (its largest magnitude over
    127), with the identity as its gradient."""
    axes = tuple(axis for axis in range(len(kernel.shape)) if axis != channel_axis % len(kernel.shape))
    scale = ops.maximum(ops.max(ops.abs(kernel), axis=axes, keepdims=True) / INT8_LEVELS, 1e-12)
    quantized = ops.round(kernel / scale) * scale
    return kernel + ops.stop_gradient(quantized - kernel)


class QuantizedOutput:
    """A layer whose output LiteRT stores as int8: with a calibrated range, the output is fake-quantized to it
    (8 bits, asymmetric, zero exactly representable, as the converter quantizes activations); without one (the
    range's ends equal), it passes unchanged."""

    def build(self, input_shape: Any) -> None:
        """The Keras layer's own weights, then the output's range."""
        super().build(input_shape)  # type: ignore[misc]  # The Keras layer class after this one in the MRO.
        self.output_range = self.add_weight(  # type: ignore[attr-defined]  # A Keras layer's method.
            name="output_range", shape=(2,), initializer="zeros", trainable=False
        )

    def quantize_output(self, outputs: Any) -> Any:
        low, high = self.output_range[0], self.output_range[1]
        quantized = tf.quantization.fake_quant_with_min_max_vars(outputs, low, tf.maximum(high, low + 1e-6))
        return tf.where(high > low, quantized, outputs)


@keras.saving.register_keras_serializable(package="pneumoscan")
class Int8Conv2D(layers.Conv2D):  # type: ignore[misc]  # Keras ships no type information.
    """A convolution whose kernel is used as LiteRT's int8 conversion will store it (per output channel)."""

    def convolution_op(self, inputs, kernel):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        return super().convolution_op(inputs, fake_quantize(kernel, channel_axis=-1))


@keras.saving.register_keras_serializable(package="pneumoscan")
class Int8DepthwiseConv2D(layers.DepthwiseConv2D):  # type: ignore[misc]  # Keras ships no type information.
    """A depthwise convolution whose kernel is used as LiteRT's int8 conversion will store it (per channel)."""

    def call(self, inputs):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        outputs = ops.depthwise_conv(
            inputs,
            fake_quantize(self.kernel, channel_axis=2),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        if self.use_bias:
            outputs = ops.add(outputs, self.bias)
        return self.activation(outputs) if self.activation is not None else outputs


@keras.saving.register_keras_serializable(package="pneumoscan")
class Int8Dense(QuantizedOutput, layers.Dense):  # type: ignore[misc]  # Keras ships no type information.
    """A fully connected layer whose kernel and output are used as LiteRT's int8 conversion will store them."""

    def call(self, inputs, training=None):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        del training  # The layer behaves the same in training and inference.
        outputs = ops.matmul(inputs, fake_quantize(self.kernel, channel_axis=-1))
        if self.use_bias:
            outputs = ops.add(outputs, self.bias)
        outputs = self.activation(outputs) if self.activation is not None else outputs
        return self.quantize_output(outputs)


@keras.saving.register_keras_serializable(package="pneumoscan")
class PassThrough(layers.Layer):  # type: ignore[misc]  # Keras ships no type information.
    """Where a batch normalisation was, once folded into the convolution before it: its input, unchanged."""

    def call(self, inputs, training=None, mask=None):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        del training, mask  # Called as the batch normalisation it replaces was.
        return inputs


@keras.saving.register_keras_serializable(package="pneumoscan")
class FoldedBatchNorm(QuantizedOutput, PassThrough):
    """A folded batch normalisation whose output (its convolution's) is stored as int8."""

    def call(self, inputs, training=None, mask=None):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        del training, mask  # Called as the batch normalisation it replaces was.
        return self.quantize_output(inputs)


@keras.saving.register_keras_serializable(package="pneumoscan")
class Int8ReLU(QuantizedOutput, layers.ReLU):  # type: ignore[misc]  # Keras ships no type information.
    """A ReLU (the fused activation of the convolution before it) whose output is stored as int8."""

    def call(self, inputs):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        return self.quantize_output(super().call(inputs))


@keras.saving.register_keras_serializable(package="pneumoscan")
class Int8Add(QuantizedOutput, layers.Add):  # type: ignore[misc]  # Keras ships no type information.
    """A residual sum stored as int8."""

    def call(self, inputs):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        return self.quantize_output(super().call(inputs))


@keras.saving.register_keras_serializable(package="pneumoscan")
class Int8Pool(QuantizedOutput, layers.GlobalAveragePooling2D):  # type: ignore[misc]  # Keras ships no types.
    """The pooled features, stored as int8."""

    def call(self, inputs):  # type: ignore[no-untyped-def]  # Keras backend tensors.
        return self.quantize_output(super().call(inputs))


QUANTIZED_CLASSES: dict[type[Any], Any] = {
    layers.Conv2D: Int8Conv2D,
    layers.DepthwiseConv2D: Int8DepthwiseConv2D,
    layers.Dense: Int8Dense,
}
"""Layers whose kernels are quantized."""
OUTPUT_CLASSES: dict[type[Any], Any] = {
    layers.ReLU: Int8ReLU,
    layers.Add: Int8Add,
    layers.GlobalAveragePooling2D: Int8Pool,
}
"""Layers without weights whose outputs are quantized."""
PLAIN_CLASSES: dict[type[Any], Any] = {
    FoldedBatchNorm: PassThrough,
    **{quantized: plain for plain, quantized in (QUANTIZED_CLASSES | OUTPUT_CLASSES).items()},
}


def _producer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The layer whose output is ``layer``'s (only) input."""
    return layer._inbound_nodes[0].input_tensors[0]._keras_history.operation  # Keras has no public graph API.


def _consumers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers that take ``layer``'s output."""
    return [node.operation for node in layer._outbound_nodes]  # Keras has no public graph API.


def folded_batch_norms(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """Each convolution of ``model`` that a batch normalisation follows, by the convolution's name."""
    folded: dict[str, keras.layers.Layer] = {}
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            producer = _producer(layer)
            if not isinstance(producer, layers.Conv2D | layers.DepthwiseConv2D) or producer.use_bias:
                raise ValueError(f"{layer.name} does not follow a convolution without bias; it cannot be folded")
            folded[producer.name] = layer
    return folded


def fold(kernel: np.ndarray, batch_norm: keras.layers.Layer, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of a convolution followed by ``batch_norm`` (in inference), as one convolution."""
    gamma, beta, mean, variance = batch_norm.get_weights()
    factor = gamma / np.sqrt(variance + batch_norm.epsilon)
    shape = [1] * kernel.ndim
    shape[channel_axis] = -1
    return (kernel * factor.reshape(shape)).astype(np.float32), (beta - mean * factor).astype(np.float32)


def _channel_axis(layer: keras.layers.Layer) -> int:
    return 2 if isinstance(layer, layers.DepthwiseConv2D) else -1


def quantization_aware_copy(model: keras.Model) -> keras.Model:
    """``model`` with its batch normalisations folded into the convolutions before them and every convolution and
    dense kernel fake-quantized; its float weights are ``model``'s (its outputs differ by the weights' rounding)."""
    batch_norms = folded_batch_norms(model)

    def rebuild(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, layers.BatchNormalization | PassThrough):
            return FoldedBatchNorm(name=layer.name)
        if type(layer) in OUTPUT_CLASSES:
            return OUTPUT_CLASSES[type(layer)].from_config(layer.get_config())
        quantized = QUANTIZED_CLASSES.get(type(layer))
        if quantized is None:
            return layer.__class__.from_config(layer.get_config())
        # Every quantized layer gets a bias: a folded batch normalisation's, the layer's own, or zeros. LiteRT
        # stores a bias for every convolution anyway, and fine-tuning may move it.
        return quantized.from_config({**layer.get_config(), "use_bias": True})

    copy = keras.models.clone_model(model, clone_function=rebuild)
    for layer in model.layers:
        if type(layer) not in QUANTIZED_CLASSES:
            if layer.weights and not isinstance(layer, layers.BatchNormalization):
                copy.get_layer(layer.name).set_weights(layer.get_weights())
            continue
        weights = layer.get_weights()
        if layer.name in batch_norms:
            weights = list(fold(weights[0], batch_norms[layer.name], _channel_axis(layer)))
        target = copy.get_layer(layer.name)
        target.kernel.assign(weights[0])
        target.bias.assign(weights[1] if len(weights) > 1 else np.zeros(target.bias.shape, dtype=np.float32))
    return copy


def quantized_outputs(model: keras.Model) -> list[Any]:
    """The layers of a quantization-aware copy whose outputs LiteRT stores as int8: each convolution's output after
    its fused activation (a ReLU when one follows, else the folded batch normalisation), the residual sums, the
    pooled features and the logit. The normalised input is exact in int8 and needs no range."""
    chosen: list[Any] = []
    for layer in model.layers:
        if not isinstance(layer, QuantizedOutput):
            continue
        consumers = _consumers(layer)
        if isinstance(layer, FoldedBatchNorm) and consumers and all(isinstance(c, layers.ReLU) for c in consumers):
            continue
        chosen.append(layer)
    return chosen


def calibrate_output_ranges(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> None:
    """Set each quantized output's range to its minimum and maximum over ``images`` (as the converter calibrates
    on its representative films); outputs are not quantized while this measures them."""
    chosen = quantized_outputs(model)
    for layer in chosen:
        layer.output_range.assign(np.zeros(2, dtype=np.float32))
    probe = keras.Model(model.input, [layer.output for layer in chosen])
    low = np.full(len(chosen), np.inf)
    high = np.full(len(chosen), -np.inf)
    for start in range(0, len(images), batch_size):
        outputs = probe(images[start : start + batch_size], training=False)
        for index, output in enumerate(outputs):
            values = np.asarray(output)
            low[index] = min(low[index], float(values.min()))
            high[index] = max(high[index], float(values.max()))
    for index, layer in enumerate(chosen):
        layer.output_range.assign(np.array([min(low[index], 0.0), max(high[index], 0.0)], dtype=np.float32))


def on_grid_copy(quantized: keras.Model) -> keras.Model:
    """A plain Keras model (no fake quantization) whose kernels are ``quantized``'s, already rounded to the int8
    grid: the converter's weight quantization of it is lossless."""

    def rebuild(layer: keras.layers.Layer) -> keras.layers.Layer:
        return PLAIN_CLASSES.get(type(layer), type(layer)).from_config(layer.get_config())

    copy = keras.models.clone_model(quantized, clone_function=rebuild)
    for layer in quantized.layers:
        if not layer.weights:
            continue
        target = copy.get_layer(layer.name)
        if type(layer) in QUANTIZED_CLASSES.values():
            kernel = np.asarray(fake_quantize(ops.convert_to_tensor(layer.kernel), _channel_axis(layer)))
            target.set_weights([kernel, np.asarray(layer.bias)] if layer.use_bias else [kernel])
        elif not isinstance(layer, QuantizedOutput):
            target.set_weights(layer.get_weights())
    return copy


@dataclass(frozen=True)
class FineTuneSettings:
    """How long and how gently the quantized copy is fine-tuned."""

    epochs: int = 2
    """Epochs over every film with the activations quantized too."""
    batch_size: int = 32
    learning_rate: float = 1e-5
    weights_only_epochs: int = 3
    """Epochs, before those with activations, with only the kernels quantized: the weights settle on the grid
    before the activations' rounding is added (measured on the release: 0.141 largest probability difference
    against 0.165 without; README: int8 serving)."""
    weights_only_films: int = 4_000
    """Films drawn afresh for each weights-only epoch."""
    weights_only_learning_rate: float = 5e-6
    feature_weight: float = 0.1
    """Weight of the pooled features' mean squared difference beside the logits'."""
    sensitivity_floor: float | None = None
    """When set, each film's squared logit difference is weighted by how much a logit error moves its calibrated
    probability, ``4 p (1 - p)`` of the float model's probability (1 at p = 0.5), but never less than this floor:
    the parity gate measures probabilities, and a film far from 0.5 can take a large logit error unseen. ``None``
    weights every film alike."""
    biases_only: bool = False
    """Train only the biases (the kernels stay the float model's, rounded)."""

    @property
    def description(self) -> str:
        """How the copy was fine-tuned, for the export candidate's method."""
        activations = _epochs(self.epochs)
        if self.weights_only_epochs == 0:
            return activations
        return f"{_epochs(self.weights_only_epochs, 'weights-only ')}, then {activations} with activations"


def _epochs(count: int, kind: str = "") -> str:
    return f"{count} {kind}epoch{'' if count == 1 else 's'}"


def with_features(model: keras.Model) -> keras.Model:
    """``model`` with its pooled features as a second output."""
    return keras.Model(model.input, [model.output, model.get_layer(POOLED_FEATURES_LAYER).output])


def clear_output_ranges(model: keras.Model) -> None:
    """Stop quantizing ``model``'s outputs (every range back to empty), leaving only its kernels quantized."""
    for layer in quantized_outputs(model):
        layer.output_range.assign(np.zeros(2, dtype=np.float32))


def fine_tune(
    float_model: keras.Model,
    quantized: keras.Model,
    images: np.ndarray,
    *,
    temperature: float,
    settings: FineTuneSettings,
    progress: Callable[[int, float], None] | None = None,
    representative: np.ndarray | None = None,
    intercept: float = 0.0,
) -> list[float]:
    """Fine-tune ``quantized`` to answer as ``float_model`` on ``images`` (uint8, training films): the squared
    difference of the logits (over the temperature) plus ``feature_weight`` times that of the pooled features
    (scaled by the float features' spread). First ``weights_only_epochs`` with only the kernels quantized, each
    on ``weights_only_films`` films drawn afresh; then ``epochs`` over every film, with activations quantized too
    when ``representative`` films are given (their ranges calibrated on those films before the first of these
    epochs and after each). The float model's probability is ``sigmoid(logit / temperature + intercept)``, the
    card's calibration, for ``settings.sensitivity_floor``. Returns the mean loss of each epoch, in order."""
    teacher = with_features(float_model)
    student = with_features(quantized)
    target_logits, target_features = teacher.predict(images, batch_size=64, verbose=0)
    feature_scale = float(np.std(target_features)) or 1.0
    film_weights = logit_weights(target_logits, temperature, intercept, settings.sensitivity_floor)
    variables = [v for v in student.trainable_variables if not settings.biases_only or v.path.endswith("bias")]
    rng = np.random.default_rng(0)
    weights_only_films = min(settings.weights_only_films, len(images))

    def phase(epochs: int, films_per_epoch: int, learning_rate: float) -> Callable[[], float]:
        """One training phase: a fresh optimizer with cosine decay over its steps; returns a one-epoch trainer."""
        steps = max(1, epochs * -(-films_per_epoch // settings.batch_size))
        optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps))

        @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]  # TensorFlow ships no types.
        def step(batch: tf.Tensor, logits: tf.Tensor, features: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                predicted_logits, predicted_features = student(batch, training=False)
                logit_loss = tf.reduce_mean(weights * tf.square((predicted_logits - logits) / temperature))
                feature_loss = tf.reduce_mean(tf.square((predicted_features - features) / feature_scale))
                loss = logit_loss + settings.feature_weight * feature_loss
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            return loss

        def epoch() -> float:
            order = rng.permutation(len(images))[:films_per_epoch]
            total, batches = 0.0, 0
            for batch in _batches(order, settings.batch_size):
                loss = step(
                    tf.constant(images[batch]),
                    tf.constant(target_logits[batch]),
                    tf.constant(target_features[batch]),
                    tf.constant(film_weights[batch]),
                )
                total, batches = total + float(loss), batches + 1
            return total / max(batches, 1)

        return epoch

    losses: list[float] = []

    def record(loss: float) -> None:
        losses.append(loss)
        logger.info("quantization-aware epoch %d: loss %.3g", len(losses), loss)
        if progress is not None:
            progress(len(losses), loss)

    if settings.weights_only_epochs:
        clear_output_ranges(quantized)
        weights_only = phase(settings.weights_only_epochs, weights_only_films, settings.weights_only_learning_rate)
        for _ in range(settings.weights_only_epochs):
            record(weights_only())
    if not settings.epochs:
        return losses
    # The ranges are calibrated before the first epoch with activations and after each (also before the next).
    if representative is not None:
        calibrate_output_ranges(quantized, representative)
    with_activations = phase(settings.epochs, len(images), settings.learning_rate)
    for _ in range(settings.epochs):
        loss = with_activations()
        if representative is not None:
            calibrate_output_ranges(quantized, representative)
        record(loss)
    return losses


def logit_weights(logits: np.ndarray, temperature: float, intercept: float, floor: float | None) -> np.ndarray:
    """Each film's weight on its squared logit difference (shaped like ``logits``): 1 for every film when ``floor``
    is ``None``, otherwise ``4 p (1 - p)`` of its calibrated probability ``p``, at least ``floor``."""
    if floor is None:
        return np.ones_like(logits, dtype=np.float32)
    probabilities = sigmoid(logits, temperature, intercept)
    return np.maximum(4.0 * probabilities * (1.0 - probabilities), floor).astype(np.float32)


def _batches(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def quantization_aware_model(
    float_model: keras.Model,
    films: np.ndarray,
    representative: np.ndarray,
    temperature: float,
    settings: FineTuneSettings,
    *,
    intercept: float = 0.0,
) -> keras.Model:
    """``float_model`` folded, fine-tuned on ``films`` with int8 weights and activations (ranges calibrated on
    ``representative``, the films the converter calibrates on) to answer as it does, and returned as a plain
    Keras model whose kernels lie on the int8 grid."""
    quantized = quantization_aware_copy(float_model)
    fine_tune(
        float_model,
        quantized,
        films,
        temperature=temperature,
        intercept=intercept,
        settings=settings,
        representative=representative,
    )
    return on_grid_copy(quantized)
