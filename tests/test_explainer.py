"""Class activation maps: exact for the pooled-linear head, equal to Grad-CAM up to scale, served with LiteRT."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from core.model_card import (
    CARD_FILE,
    EXPLAINER_FILE,
    MODEL_FILE,
    ModelArtifactError,
    ServingSpec,
    read_card,
    sha256_of,
    verify_artifact,
)
from core.model_registry import ModelRegistry
from core.preprocessing import preprocess
from scoring.classifier import Classifier
from scoring.explainer import Explainer, render_overlay
from tests.conftest import MODEL_BUCKET, RELEASE_MODEL, noise_image, release_copy
from training.explain import ExplainerParityError, build_cam_model, cam_bias, export_explainer
from training.export import convert
from training.models import build_classifier, build_ensemble

SIZE = 128
"""Small, but large enough for a 2 x 2 grid: at 64 px the compact model's grid is a single cell."""


def _batch(count: int, seed: int) -> np.ndarray:
    """Noise images, half of them with a dark quadrant so that the maps have spatial structure."""
    images = np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 1), dtype=np.uint8)
    images[: count // 2, : SIZE // 2, : SIZE // 2] //= 4
    return images


def _compact(seed: int) -> keras.Model:
    """A compact model with random weights and batch-norm statistics measured on a batch of images.

    Freshly initialised, its stack of separable convolutions shrinks the activations to about 1e-7, so every
    comparison would pass trivially; measured statistics bring them to the scale of a trained model."""
    keras.utils.set_random_seed(seed)
    model = build_classifier("compact", size=SIZE)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(_batch(16, seed=seed + 100), training=True)
    return model


def _reconstructed_logits(classifier: keras.Model, batch: np.ndarray) -> np.ndarray:
    cam_model = build_cam_model(classifier)
    bias = cam_bias(classifier)
    assert cam_model is not None
    assert bias is not None
    maps = cam_model.predict(batch, verbose=0)
    assert maps.shape == (len(batch), 2, 2)
    return np.asarray(bias + maps.mean(axis=(1, 2)))


def _spec(size: int) -> ServingSpec:
    return ServingSpec("test", size, ("NORMAL", "PNEUMONIA"), 1.0, 0.5, "", None)


def _sample_pixels(sample_paths: list[Path], size: int) -> np.ndarray:
    return np.stack([preprocess(path.read_bytes(), size=size).pixels for path in sample_paths])


@pytest.mark.slow
def test_cam_mean_plus_bias_is_the_logit() -> None:
    """For a compact model, the bias plus the mean of the contribution map is the classifier's logit."""
    classifier = _compact(seed=0)
    batch = _batch(6, seed=1)
    expected = classifier.predict(batch, verbose=0).reshape(-1)
    assert np.std(expected) > 0.1  # The logits vary, so agreement is not a coincidence of tiny numbers.
    assert _reconstructed_logits(classifier, batch) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_positive_cam_is_grad_cam_up_to_scale() -> None:
    """ReLU of the map equals Grad-CAM computed with gradients at the pooling layer's input, after normalising."""
    classifier = _compact(seed=2)
    batch = _batch(8, seed=3)
    cam_model = build_cam_model(classifier)
    assert cam_model is not None
    cam = np.maximum(cam_model.predict(batch, verbose=0), 0.0)
    features_and_logit = keras.Model(classifier.inputs, [classifier.get_layer("pool").input, classifier.outputs[0]])
    with tf.GradientTape() as tape:
        features, logit = features_and_logit(tf.constant(batch), training=False)
    gradients = tape.gradient(logit, features).numpy()
    alphas = gradients.mean(axis=(1, 2), keepdims=True)  # Grad-CAM's channel weights: pooled gradients.
    grad_cam = np.maximum((alphas * features.numpy()).sum(axis=-1), 0.0)
    explained = 0
    for cam_map, grad_cam_map in zip(cam, grad_cam, strict=True):
        if cam_map.max() <= 1e-6:
            assert grad_cam_map.max() <= 1e-6
            continue
        explained += 1
        assert cam_map / cam_map.max() == pytest.approx(grad_cam_map / grad_cam_map.max(), abs=1e-4)
    assert explained >= 2
    assert (cam == 0).any()  # Some cells hold evidence against pneumonia, which the ReLU removes in both.


@pytest.mark.slow
def test_ensemble_map_is_the_mean_of_member_maps() -> None:
    """For an ensemble of two members, the mean bias plus the mean of the averaged map is the ensemble's logit."""
    ensemble = build_ensemble([_compact(seed=4), _compact(seed=5)])
    batch = _batch(5, seed=6)
    expected = ensemble.predict(batch, verbose=0).reshape(-1)
    assert np.std(expected) > 0.1
    assert _reconstructed_logits(ensemble, batch) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["cnn", "mlp"])
def test_architecture_without_pooled_linear_head_has_no_explainer(architecture: str, tmp_path: Path) -> None:
    """A head with a hidden dense layer after pooling has no exact class activation map, so no explainer."""
    classifier = build_classifier(architecture, size=64)
    assert build_cam_model(classifier) is None
    assert cam_bias(classifier) is None
    section = export_explainer(classifier, tmp_path, served_model=tmp_path / MODEL_FILE, images=_batch(1, seed=0))
    assert section is None
    assert not (tmp_path / EXPLAINER_FILE).exists()


@pytest.mark.slow
def test_exported_explainer_reproduces_the_served_logits(tmp_path: Path) -> None:
    """explain.tflite run by LiteRT gives maps whose mean plus bias is the exported model.tflite's logit."""
    classifier = _compact(seed=7)
    batch = _batch(12, seed=8)
    (tmp_path / MODEL_FILE).write_bytes(convert(classifier, "float32", batch))
    section = export_explainer(classifier, tmp_path, served_model=tmp_path / MODEL_FILE, images=batch)
    assert section is not None
    assert section["file"] == EXPLAINER_FILE
    assert section["sha256"] == sha256_of(tmp_path / EXPLAINER_FILE)
    assert section["size_bytes"] == (tmp_path / EXPLAINER_FILE).stat().st_size
    assert section["grid"] == 2
    assert section["max_logit_difference"] <= 1e-3
    explainer = Explainer(tmp_path / EXPLAINER_FILE)
    served = Classifier(tmp_path / MODEL_FILE, _spec(SIZE))
    fresh = _batch(3, seed=9)  # Images the gate never saw, in a different batch size.
    maps = explainer.maps(fresh)
    assert maps.shape == (3, 2, 2)
    assert maps.dtype == np.float32
    assert section["bias"] + maps.mean(axis=(1, 2)) == pytest.approx(served.logits(fresh), abs=1e-3)


@pytest.mark.slow
def test_explainer_of_another_model_fails_the_gate(tmp_path: Path) -> None:
    """When the Keras model is not the one served, the gate raises and no explainer file is left behind."""
    batch = _batch(4, seed=10)
    (tmp_path / MODEL_FILE).write_bytes(convert(_compact(seed=11), "float32", batch))
    with pytest.raises(ExplainerParityError, match="differs from the served logits"):
        export_explainer(_compact(seed=12), tmp_path, served_model=tmp_path / MODEL_FILE, images=batch)
    assert not (tmp_path / EXPLAINER_FILE).exists()


def test_release_explainer_reproduces_the_release_logits(sample_paths: list[Path]) -> None:
    """The release artifact's explainer gives maps of its card's grid (the backbone's stride-32 feature map: 6 x 6
    at 192 px) whose mean plus bias is the served logit on the samples."""
    classifier = Classifier.from_directory(RELEASE_MODEL)
    explainer = classifier.explainer
    assert explainer is not None
    assert classifier.explainer is explainer  # Loaded once, then kept.
    assert classifier.spec.explainer_bias is not None
    pixels = _sample_pixels(sample_paths, classifier.input_size)
    maps = explainer.maps(pixels)
    grid = read_card(RELEASE_MODEL)["explainer"]["grid"]
    assert grid == classifier.input_size // 32
    assert maps.shape == (len(sample_paths), grid, grid)
    reconstructed = classifier.spec.explainer_bias + maps.astype(np.float64).mean(axis=(1, 2))
    assert np.max(np.abs(reconstructed - classifier.logits(pixels))) <= 1e-3
    assert read_card(RELEASE_MODEL)["explainer"]["max_logit_difference"] <= 1e-3


def test_tampered_or_missing_explainer_is_refused(tmp_path: Path) -> None:
    """An explainer file that is missing or does not match its card's sha256 fails verification."""
    artifact = release_copy(tmp_path / "artifact")
    data = bytearray((artifact / EXPLAINER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (artifact / EXPLAINER_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="sha256"):
        verify_artifact(artifact)
    (artifact / EXPLAINER_FILE).unlink()
    with pytest.raises(ModelArtifactError, match="does not exist"):
        verify_artifact(artifact)


def test_explainer_replaced_after_loading_is_refused(tmp_path: Path) -> None:
    """The explainer is checked again when it is first used, so a file changed since the model loaded is refused."""
    artifact = release_copy(tmp_path / "artifact")
    classifier = Classifier.from_directory(artifact)
    with (artifact / EXPLAINER_FILE).open("ab") as explainer:
        explainer.write(b"\0")
    with pytest.raises(ModelArtifactError, match="sha256"):
        _ = classifier.explainer


def test_card_without_explainer_serves_without_one(tmp_path: Path) -> None:
    """An artifact whose card names no explainer loads, verifies and has no explainer, whatever files lie beside it."""
    artifact = release_copy(tmp_path / "artifact")
    card = read_card(artifact)
    del card["explainer"]
    (artifact / CARD_FILE).write_text(json.dumps(card))
    spec = verify_artifact(artifact)
    assert (spec.explainer_sha256, spec.explainer_bias) == (None, None)
    assert Classifier.from_directory(artifact).explainer is None


def test_card_naming_another_explainer_file_is_refused(tmp_path: Path) -> None:
    """The explainer's file name is fixed, so a card cannot point the scorer at another path."""
    artifact = release_copy(tmp_path / "artifact")
    card = read_card(artifact)
    card["explainer"]["file"] = "../elsewhere.tflite"
    (artifact / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelArtifactError, match="explainer"):
        verify_artifact(artifact)


def test_explainer_rejects_pixels_of_the_wrong_shape() -> None:
    """Maps are computed only for a (n, size, size, 1) batch of the explainer's input size."""
    explainer = Classifier.from_directory(RELEASE_MODEL).explainer
    assert explainer is not None
    with pytest.raises(ValueError, match="expected"):
        explainer.maps(np.zeros((1, 64, 64, 1), dtype=np.uint8))


def _decode_png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_overlay_is_a_png_that_keeps_the_aspect_ratio(sample_xray: Image.Image) -> None:
    """A 2048 x 1856 film becomes a 512 x 464 PNG; a film smaller than that keeps its size."""
    large = sample_xray.resize((2048, 1856), Image.Resampling.BICUBIC)
    heat = np.array([[0.0, 1.0, 0.0], [2.0, 3.0, 0.5], [-1.0, 0.0, 0.0]], dtype=np.float32)
    overlay = _decode_png(render_overlay(large, heat))
    assert overlay.size == (512, 464)
    assert overlay.mode == "RGB"
    small = noise_image(300, 200)
    assert _decode_png(render_overlay(small, heat)).size == (300, 200)
    tall = noise_image(900, 1800)
    assert _decode_png(render_overlay(tall, heat, max_side=256)).size == (128, 256)


def test_overlay_without_positive_evidence_is_the_plain_film() -> None:
    """A map with no positive cell (no evidence for pneumonia) draws nothing: the pixels are the grey film."""
    film = noise_image(400, 300, seed=4)
    overlay = _decode_png(render_overlay(film, np.full((3, 3), -2.0, dtype=np.float32)))
    assert np.array_equal(np.asarray(overlay), np.asarray(film.convert("RGB")))


def test_overlay_heat_lands_where_the_map_is_positive() -> None:
    """A hot top-left cell colours the film's top-left corner red-yellow and leaves the bottom-right grey."""
    film = Image.new("L", (300, 300), 128)
    heat = np.array([[5.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=np.float32)
    pixels = np.asarray(_decode_png(render_overlay(film, heat))).astype(int)
    red, green, blue = pixels[10, 10]
    assert red > 200  # Full heat is yellow, blended over the grey film.
    assert green > 150
    assert blue < 100
    assert tuple(pixels[290, 290]) == (128, 128, 128)


def test_registry_round_trip_carries_the_explainer(s3: Any, tmp_path: Path) -> None:
    """Publishing uploads explain.tflite, and downloading the version brings it back, verified."""
    artifact = release_copy(tmp_path / "artifact")
    registry = ModelRegistry(s3, MODEL_BUCKET)
    prefix = registry.publish(artifact)
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=MODEL_BUCKET)["Contents"]}
    assert f"{prefix}{EXPLAINER_FILE}" in keys
    spec = registry.download(prefix, tmp_path / "downloaded")
    assert spec.explainer_sha256 == sha256_of(artifact / EXPLAINER_FILE)
    assert sha256_of(tmp_path / "downloaded" / EXPLAINER_FILE) == spec.explainer_sha256
    assert Classifier.from_directory(tmp_path / "downloaded").explainer is not None


def test_registry_round_trip_without_explainer(s3: Any, tmp_path: Path) -> None:
    """An artifact without an explainer publishes and downloads its other files, with no explain.tflite."""
    artifact = release_copy(tmp_path / "artifact")
    (artifact / EXPLAINER_FILE).unlink()
    card = read_card(artifact)
    del card["explainer"]
    (artifact / CARD_FILE).write_text(json.dumps(card))
    registry = ModelRegistry(s3, MODEL_BUCKET)
    prefix = registry.publish(artifact)
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=MODEL_BUCKET)["Contents"]}
    served = sorted(path.name for path in artifact.iterdir())
    assert EXPLAINER_FILE not in served
    assert {f"{prefix}{name}" for name in served} == keys
    registry.download(prefix, tmp_path / "downloaded")
    assert sorted(p.name for p in (tmp_path / "downloaded").iterdir()) == served
