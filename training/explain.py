"""The explainer: a LiteRT model that maps an image to where the classifier found evidence of pneumonia.

For a network whose head is global average pooling followed by one linear unit (dropout in between is the
identity at inference), the class activation map of Zhou et al. (2016) is exact. With the pooled layer's input
``A_k(i, j)`` and the unit's weights ``w_k`` and bias ``b``, the map ``M(i, j) = sum_k w_k A_k(i, j)`` satisfies
``logit = b + mean_ij M(i, j)``: every grid cell's share of the logit. Grad-CAM (Selvaraju et al., 2017) weighs
the same feature maps by ``alpha_k = w_k / Z`` for this head, so Grad-CAM is ``ReLU(M)`` up to a positive scale.
An ensemble's logit is the mean of its members' logits, so its map is the mean of their maps (they share a grid)
and its bias the mean of their biases.

``export_explainer`` converts that map to ``explain.tflite`` and checks with the LiteRT runtime that the map's mean
plus the bias reproduces the served model's logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from core.model_card import EXPLAINER_FILE, sha256_of
from scoring.explainer import Explainer
from scoring.litert import ClassifierModel
from training.export import convert
from training.models import PerImageStandardization  # noqa: F401  # Registered for the saved models that use it.

logger = logging.getLogger(__name__)

EXPLAINER_TOLERANCE = 1e-3
"""Largest allowed absolute difference between the explainer's ``bias + mean(map)`` and the served logit."""

METHOD = (
    "class activation map (CAM, Zhou et al. 2016), equal to Grad-CAM up to scale for a global-average-pooled "
    "linear head"
)


class ExplainerParityError(RuntimeError):
    """The exported explainer does not reproduce the served model's logits within ``EXPLAINER_TOLERANCE``."""


@dataclass(frozen=True)
class LinearHead:
    """One network's pooled-linear head: the model up to the pooling layer's input, and the unit after it."""

    features: keras.Model
    """Image -> ``(n, g, g, k)`` feature maps, the input of the global average pooling."""
    weights: np.ndarray
    """``(k,)`` weights of the logit unit."""
    bias: float


def linear_heads(classifier: keras.Model) -> list[LinearHead] | None:
    """The heads of a single network or of each ensemble member, or None when any head is not pooled-linear."""
    head, reason = _linear_head(classifier)
    if head is not None:
        return [head]
    members = _ensemble_members(classifier)
    if members is None:
        logger.info("no class activation map for model %r: %s", classifier.name, reason)
        return None
    heads = []
    for member in members:
        head, reason = _linear_head(member)
        if head is None:
            logger.info("no class activation map for ensemble member %r: %s", member.name, reason)
            return None
        heads.append(head)
    grids = {tuple(head.features.output.shape[1:3]) for head in heads}
    if len(grids) != 1:
        logger.info("no class activation map for model %r: its members' grids differ (%s)", classifier.name, grids)
        return None
    return heads


def build_cam_model(classifier: keras.Model) -> keras.Model | None:
    """A model from the classifier's uint8 input to its ``(n, g, g)`` map of logit contributions, averaged across
    ensemble members; None for an architecture whose head is not global average pooling -> dense(1) linear."""
    heads = linear_heads(classifier)
    if heads is None:
        return None
    inputs = keras.Input(shape=classifier.input_shape[1:], dtype="uint8", name="image")
    maps = []
    for index, head in enumerate(heads):
        # A dense layer on the channel axis is the weighted sum of the feature maps, cell by cell.
        contribution = layers.Dense(1, use_bias=False, name=f"contribution{index}")
        maps.append(contribution(head.features(inputs)))
        contribution.set_weights([head.weights.reshape(-1, 1).astype(np.float32)])
    mean = maps[0] if len(maps) == 1 else layers.Average(name="mean_contribution")(maps)
    rows, columns = mean.shape[1], mean.shape[2]
    if rows != columns:
        logger.info("no class activation map for model %r: its grid is %d x %d", classifier.name, rows, columns)
        return None
    contribution_map = layers.Reshape((rows, columns), name="contribution_map")(mean)
    return keras.Model(inputs, contribution_map, name="class_activation_map")


def cam_bias(classifier: keras.Model) -> float | None:
    """The bias ``b`` with ``logit = b + mean(map)``: the mean of the members' biases; None without a CAM."""
    heads = linear_heads(classifier)
    if heads is None:
        return None
    return float(np.mean([head.bias for head in heads]))


def export_explainer(
    classifier: keras.Model, output_dir: Path, *, served_model: Path, images: np.ndarray
) -> dict[str, Any] | None:
    """Write ``explain.tflite`` to ``output_dir`` and return the card's ``explainer`` section, after checking with
    the LiteRT runtime that ``bias + mean(map)`` equals the served model's logits on ``images``.

    Returns None, writing nothing, when the architecture has no class activation map. Raises
    ``ExplainerParityError``, leaving no explainer file behind, when the check fails."""
    cam_model = build_cam_model(classifier)
    bias = cam_bias(classifier)
    if cam_model is None or bias is None:
        return None
    path = output_dir / EXPLAINER_FILE
    path.write_bytes(convert(cam_model, "float32", images))
    try:
        difference = max_logit_difference(path, served_model, bias, images)
    except Exception:
        path.unlink()
        raise
    if not difference <= EXPLAINER_TOLERANCE:  # Also true for NaN, which must fail the gate.
        path.unlink()
        raise ExplainerParityError(
            f"bias + mean(class activation map) differs from the served logits by up to {difference:.2e}, "
            f"above the tolerance {EXPLAINER_TOLERANCE}"
        )
    grid = int(cam_model.output_shape[1])
    logger.info("explainer: %d x %d grid, max logit difference %.2e on %d images", grid, grid, difference, len(images))
    return {
        "file": EXPLAINER_FILE,
        "sha256": sha256_of(path),
        "size_bytes": path.stat().st_size,
        "method": METHOD,
        "grid": grid,
        "bias": bias,
        "max_logit_difference": difference,
        "tolerance": EXPLAINER_TOLERANCE,
    }


def max_logit_difference(explainer_path: Path, served_model: Path, bias: float, images: np.ndarray) -> float:
    """Largest ``|bias + mean(map) - served logit|`` over ``images``, both run in the LiteRT runtime that serves."""
    if len(images) == 0:
        raise ValueError("the parity check needs at least one image")
    explainer = Explainer(explainer_path)
    served = ClassifierModel(served_model)
    differences = []
    for start in range(0, len(images), 32):
        batch = images[start : start + 32]
        reconstructed = bias + explainer.maps(batch).astype(np.float64).mean(axis=(1, 2))
        differences.append(np.abs(reconstructed - served.logits(batch)))
    return float(np.max(np.concatenate(differences)))


def _linear_head(model: keras.Model) -> tuple[LinearHead | None, str]:
    """The model's head if it is global average pooling -> (dropout) -> dense(1) linear, else the reason not."""
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        return None, "it is not a functional model with one output"
    unit = _producer(model, outputs[0])
    if not isinstance(unit, layers.Dense) or unit.units != 1 or unit.activation is not keras.activations.linear:
        return None, "its output is not one linear dense unit"
    pooling = _producer(model, unit.input)
    while isinstance(pooling, layers.Dropout):
        pooling = _producer(model, pooling.input)
    if not isinstance(pooling, layers.GlobalAveragePooling2D):
        return None, "its head is not global average pooling -> (dropout) -> dense(1) linear"
    if pooling.data_format != "channels_last" or pooling.keepdims:
        return None, "its global average pooling is not channels-last without kept dimensions"
    weights = unit.get_weights()
    kernel = np.asarray(weights[0], dtype=np.float64).reshape(-1)
    bias = float(np.asarray(weights[1]).reshape(-1)[0]) if unit.use_bias else 0.0
    features = keras.Model(model.inputs, pooling.input, name=f"{model.name}_features")
    return LinearHead(features=features, weights=kernel, bias=bias), ""


def _ensemble_members(classifier: keras.Model) -> list[keras.Model] | None:
    """The members of a ``build_ensemble`` model: sub-models on the same input whose logits one layer averages."""
    if not isinstance(getattr(classifier, "layers", None), list) or not classifier.layers:
        return None
    members = [layer for layer in classifier.layers if isinstance(layer, keras.Model)]
    others = [layer for layer in classifier.layers if not isinstance(layer, (keras.Model, layers.InputLayer))]
    if len(members) < 2 or len(others) != 1 or not isinstance(others[0], layers.Average):
        return None
    return members


def _producer(model: keras.Model, tensor: Any) -> Any:
    """The layer of ``model`` whose output is ``tensor``, or None."""
    for layer in model.layers:
        try:
            output = layer.output
        except (AttributeError, ValueError):
            # A layer called more than once, or never, has no single output; it cannot be part of the head.
            continue
        if output is tensor:
            return layer
    return None
