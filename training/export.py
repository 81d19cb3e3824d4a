"""Export to LiteRT with a parity gate: float32 or int8, chosen by measured parity and speed."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from core.labels import OperatingPoints
from scoring.litert import ClassifierModel
from training.calibration import sigmoid
from training.gate import serving_model

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 0.02
"""Largest allowed absolute difference between the Keras and LiteRT calibrated probabilities."""

INT8_MIN_SPEEDUP = 1.2
"""int8 is served only when it is at least this much faster than float32 (and within tolerance)."""


class ParityError(RuntimeError):
    """The exported model disagrees with the Keras model beyond ``PARITY_TOLERANCE``."""


@dataclass(frozen=True)
class ExportCandidate:
    """One converted model with its measured parity and speed."""

    quantization: str
    size_bytes: int
    max_probability_difference: float
    label_agreement: float
    label_flips: int
    """Validation images whose label at either operating point differs from the Keras model's although the Keras
    probability is further than ``PARITY_TOLERANCE`` from that point: any such flip fails the gate."""
    milliseconds_per_image: float

    @property
    def passes(self) -> bool:
        """Whether the candidate passes the parity gate (NaN differences fail)."""
        return self.max_probability_difference <= PARITY_TOLERANCE and self.label_flips == 0


@dataclass(frozen=True)
class ExportResult:
    """The chosen model bytes and the measurements behind the choice."""

    model_bytes: bytes
    chosen: ExportCandidate
    candidates: tuple[ExportCandidate, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "chosen": self.chosen.quantization,
            "tolerance": PARITY_TOLERANCE,
            "candidates": [asdict(c) for c in self.candidates],
        }


def convert(classifier: keras.Model, quantization: str, representative_images: np.ndarray) -> bytes:
    """Convert a Keras model to a LiteRT flatbuffer (float32, or int8 weights and activations)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(classifier)
    if quantization == "int8":

        def representative_dataset() -> Iterator[list[np.ndarray]]:
            for image in representative_images:
                yield [image[np.newaxis].astype(np.uint8)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
    model_bytes: bytes = converter.convert()
    return model_bytes


def measure(
    model_bytes: bytes,
    *,
    quantization: str,
    images: np.ndarray,
    keras_probabilities: np.ndarray,
    temperature: float,
    thresholds: tuple[float, ...],
) -> ExportCandidate:
    """Score ``images`` with the LiteRT runtime that serves, and compare with the Keras probabilities."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.tflite"
        path.write_bytes(model_bytes)
        model = ClassifierModel(path)
        logits, _ = model.run_in_batches(images, batch_size=32)
        single = images[:1]
        model.run(single)
        started = time.perf_counter()
        repeats = 20
        for _ in range(repeats):
            model.run(single)
        milliseconds = (time.perf_counter() - started) * 1000 / repeats
    probabilities = sigmoid(logits, temperature)
    flipped = np.zeros(len(probabilities), dtype=bool)
    far_flips = np.zeros(len(probabilities), dtype=bool)
    for threshold in thresholds:
        flipped_here = (probabilities >= threshold) != (keras_probabilities >= threshold)
        flipped |= flipped_here
        far_flips |= flipped_here & (np.abs(keras_probabilities - threshold) > PARITY_TOLERANCE)
    return ExportCandidate(
        quantization=quantization,
        size_bytes=len(model_bytes),
        max_probability_difference=float(np.max(np.abs(probabilities - keras_probabilities))),
        label_agreement=float(np.mean(~flipped)),
        label_flips=int(np.sum(far_flips)),
        milliseconds_per_image=milliseconds,
    )


def export(
    classifier: keras.Model,
    *,
    validation_images: np.ndarray,
    keras_probabilities: np.ndarray,
    temperature: float,
    operating_points: OperatingPoints,
    quantization: str = "auto",
    seed: int = 0,
) -> ExportResult:
    """Convert, measure every requested quantization on validation images, gate on parity of probabilities and
    labels at both operating points, pick one. The served model also outputs the pooled features the input gate
    reads."""
    rng = np.random.default_rng(seed)
    representative = validation_images[rng.permutation(len(validation_images))[:200]]
    requested = ("float32", "int8") if quantization == "auto" else (quantization,)
    candidates: list[tuple[ExportCandidate, bytes]] = []
    for name in requested:
        model_bytes = convert(serving_model(classifier), name, representative)
        candidate = measure(
            model_bytes,
            quantization=name,
            images=validation_images,
            keras_probabilities=keras_probabilities,
            temperature=temperature,
            thresholds=(operating_points.normal_below, operating_points.pneumonia_from),
        )
        logger.info("LiteRT %s candidate: %s", name, candidate)
        candidates.append((candidate, model_bytes))
    passing = [(c, b) for c, b in candidates if c.passes]
    if not passing:
        best = min((c for c, _ in candidates), key=lambda c: c.max_probability_difference)
        raise ParityError(
            f"exported model differs from Keras by up to {best.max_probability_difference:.4f} in probability "
            f"(tolerance {PARITY_TOLERANCE}) and changes {best.label_flips} label(s) at the operating points on "
            "validation images"
        )
    chosen, chosen_bytes = passing[0]
    for candidate, model_bytes in passing[1:]:
        if candidate.milliseconds_per_image * INT8_MIN_SPEEDUP <= chosen.milliseconds_per_image:
            chosen, chosen_bytes = candidate, model_bytes
    return ExportResult(model_bytes=chosen_bytes, chosen=chosen, candidates=tuple(c for c, _ in candidates))
