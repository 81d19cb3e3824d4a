"""Export to LiteRT with a parity gate: float32 or int8, chosen by measured parity and speed.

The int8 candidate is full-integer (int8 weights, per channel, and int8 activations behind a float interface)
except for the layers the TensorFlow Lite quantization debugger measures as quantizing badly, which stay float.
Its activation ranges are calibrated on a representative set of training films from every source family, each
beside one mild acquisition variant of itself (``training.augment``). It is served only when it passes the same
parity gate as float32 (probabilities within ``PARITY_TOLERANCE`` of Keras, no label flip far from an operating
point) and its validation AUC is within ``AUC_TOLERANCE`` of the Keras model's. When this post-training int8 fails
the gate, a copy fine-tuned quantization-aware (``training.quantization_aware``) is converted and gated against the
same Keras model.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from core.labels import OperatingPoints
from scoring.litert import ClassifierModel
from training.augment import AugmentationSettings, augment_film
from training.calibration import sigmoid
from training.data import ImageSet, LabelledFile, image_family, load_images
from training.gate import serving_model
from training.quantization_aware import FineTuneSettings, quantization_aware_model

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 0.02
"""Largest allowed absolute difference between the Keras and LiteRT calibrated probabilities."""

INT8_MIN_SPEEDUP = 1.2
"""int8 is served only when it is at least this much faster than float32 (and within tolerance)."""

AUC_TOLERANCE = 0.002
"""Largest allowed drop of a candidate's validation AUC below the Keras model's."""

AUC_RESOLUTION = 1e-6
"""Both AUCs are computed on probabilities rounded to this step, so float noise between near-tied films (a smoke
model's nearly constant outputs differ by 1e-10) cannot reorder them; a rank change int8 makes is far larger."""

REPRESENTATIVE_FILMS = 400
"""Training films whose activations calibrate the int8 ranges, spread over the source families by their share."""

REPRESENTATIVE_STRENGTH = 0.3
"""Strength of the one acquisition variant (``training.augment``) each representative film is joined by: mild, so
the ranges cover the films serving sees without being stretched by the rarest transforms."""

DEBUG_FILMS = 64
"""Representative films the quantization debugger runs to measure each layer's error."""

DENYLIST_ERROR_RATIO = 1.0
"""A layer whose int8 output's root-mean-square error (its input quantized as the model quantizes it) exceeds this
many quantization steps stays float. Rounding alone gives 1/sqrt(12), about 0.29 of a step; the layers above 1
are the few that quantize badly (in EfficientNet-Lite0, its stem and first depthwise convolution)."""


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
    validation_auc: float
    keras_validation_auc: float
    float_layers: tuple[str, ...] = ()
    """Layers of an int8 candidate kept float because they quantize badly (empty for float32)."""
    method: str = ""
    """How an int8 candidate was made: post-training quantization of the model's weights, or quantization-aware
    fine-tuning of a copy of them (``training.quantization_aware``); empty for float32."""

    @property
    def failures(self) -> tuple[str, ...]:
        """Why the candidate fails the parity gate, one sentence per reason (NaN differences fail)."""
        reasons: list[str] = []
        if not self.max_probability_difference <= PARITY_TOLERANCE:
            reasons.append(
                f"probabilities differ from Keras by up to {self.max_probability_difference:.4f} "
                f"(tolerance {PARITY_TOLERANCE})"
            )
        if self.label_flips:
            reasons.append(f"{self.label_flips} label(s) flip far from an operating point")
        if not self.keras_validation_auc - self.validation_auc <= AUC_TOLERANCE:
            reasons.append(
                f"validation AUC {self.validation_auc:.4f} against Keras {self.keras_validation_auc:.4f} "
                f"(tolerance {AUC_TOLERANCE})"
            )
        return tuple(reasons)

    @property
    def passes(self) -> bool:
        """Whether the candidate passes the parity gate."""
        return not self.failures

    @property
    def name(self) -> str:
        """The quantization, with how it was made when that is not post-training quantization."""
        aware = self.method.startswith("quantization-aware")
        return f"{self.quantization} ({self.method})" if aware else self.quantization

    def summary(self) -> str:
        """Its figures in one line, for the card's reason and errors."""
        return (
            f"{self.name}: {self.milliseconds_per_image:.2f} ms per image, {self.size_bytes / 1e6:.1f} MB, "
            f"probability difference up to {self.max_probability_difference:.4f}, {self.label_flips} far flip(s), "
            f"validation AUC {self.validation_auc:.4f} (Keras {self.keras_validation_auc:.4f})"
        )


@dataclass(frozen=True)
class ExportResult:
    """The chosen model bytes and the measurements behind the choice."""

    model_bytes: bytes
    chosen: ExportCandidate
    candidates: tuple[ExportCandidate, ...]
    reason: str = ""
    """Why the chosen candidate is served, with the figures that decided it."""
    float_bytes: bytes = b""
    """The float32 candidate's model, when one was converted: the float explainer is checked against it, and an
    int8 choice falls back to it when the trust checks fitted on int8 features do worse (``fall_back``)."""

    def fall_back(self, why: str) -> ExportResult:
        """The float32 candidate served instead of the chosen one, with ``why`` added to the reason."""
        floats = [c for c in self.candidates if c.quantization == "float32"]
        if not floats or not self.float_bytes:
            raise ParityError(f"no float32 candidate to fall back to: {why}")
        reason = f"float32 is served: {why}. By parity and speed alone: {self.reason}"
        return ExportResult(self.float_bytes, floats[0], self.candidates, reason, self.float_bytes)

    def to_dict(self) -> dict[str, object]:
        return {
            "chosen": self.chosen.quantization,
            "reason": self.reason,
            "tolerance": PARITY_TOLERANCE,
            "auc_tolerance": AUC_TOLERANCE,
            "candidates": [asdict(c) for c in self.candidates],
        }


def representative_films(
    files: Sequence[LabelledFile],
    size: int,
    *,
    count: int = REPRESENTATIVE_FILMS,
    strength: float = REPRESENTATIVE_STRENGTH,
    seed: int = 0,
) -> np.ndarray:
    """About ``count`` of the (training) ``files``, drawn from each source family in proportion to its share, each
    followed by one acquisition variant of itself at ``strength``; ``(2 * n, size, size, 1)`` uint8."""
    rng = np.random.default_rng(seed)
    families = np.array([image_family(item.path.name) for item in files])
    picked: list[int] = []
    for family in sorted(set(families.tolist())):
        members = np.flatnonzero(families == family)
        share = max(1, round(count * len(members) / len(files)))
        picked.extend(int(i) for i in rng.choice(members, min(share, len(members)), replace=False))
    images = load_images([files[i] for i in sorted(picked)], size=size).images
    tf.random.set_seed(seed)
    settings = AugmentationSettings(strength)
    variants = np.stack([augment_film(tf.constant(image), settings).numpy() for image in images])
    return np.concatenate([images, variants])


def convert(
    classifier: keras.Model,
    quantization: str,
    representative_images: np.ndarray,
    float_layers: tuple[str, ...] = (),
) -> bytes:
    """Convert a Keras model to a LiteRT flatbuffer (float32, or int8 weights and activations with the layers
    whose output tensors ``float_layers`` names kept float)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(classifier)
    if quantization != "int8":
        float_bytes: bytes = converter.convert()
        return float_bytes
    dataset = _dataset(representative_images)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    if not float_layers:
        int8_bytes: bytes = converter.convert()
        return int8_bytes
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(float_layers))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=dataset, debug_options=options
    )
    selective_bytes: bytes = debugger.get_nondebug_quantized_model()
    return selective_bytes


@dataclass(frozen=True)
class LayerError:
    """One layer's int8 output error as the quantization debugger measures it."""

    tensor: str
    """The layer's output tensor in the converted model (the name ``denylisted_nodes`` takes)."""
    operation: str
    error_in_steps: float
    """Root-mean-square error of the layer's int8 output in units of its quantization step."""


def layer_errors(classifier: keras.Model, representative_images: np.ndarray) -> tuple[LayerError, ...]:
    """Each quantized layer's output error on the first ``DEBUG_FILMS`` representative films, in model order."""
    converter = tf.lite.TFLiteConverter.from_keras_model(classifier)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _dataset(representative_images)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=_dataset(representative_images[:DEBUG_FILMS])
    )
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    errors = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"])
        steps = float(np.sqrt(float(row["mean_squared_error"]))) / scale if scale > 0 else 0.0
        errors.append(LayerError(row["tensor_name"], row["op_name"], steps))
    return tuple(errors)


def badly_quantized(errors: tuple[LayerError, ...]) -> tuple[str, ...]:
    """The output tensors of the layers whose error exceeds ``DENYLIST_ERROR_RATIO`` steps."""
    return tuple(error.tensor for error in errors if error.error_in_steps > DENYLIST_ERROR_RATIO)


def layer_name(tensor: str) -> str:
    """A readable name for a converted layer's output tensor: the first of the fused operations it names."""
    return tensor.split(";", 1)[0]


def _dataset(images: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    def representative_dataset() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[np.newaxis].astype(np.uint8)]

    return representative_dataset


def measure(
    model_bytes: bytes,
    *,
    quantization: str,
    images: np.ndarray,
    labels: np.ndarray,
    keras_probabilities: np.ndarray,
    temperature: float,
    thresholds: tuple[float, ...],
    float_layers: tuple[str, ...] = (),
    intercept: float = 0.0,
) -> ExportCandidate:
    """Score ``images`` with the LiteRT runtime that serves, calibrated as the card says
    (``sigmoid(logit / temperature + intercept)``), and compare with the Keras probabilities."""
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
    probabilities = sigmoid(logits, temperature, intercept)
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
        validation_auc=measure_auc(labels, probabilities),
        keras_validation_auc=measure_auc(labels, keras_probabilities),
        float_layers=tuple(layer_name(tensor) for tensor in float_layers),
    )


def measure_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The ROC AUC, NaN when the labels hold one class only or a probability is not a number."""
    if len(np.unique(labels)) < 2 or not np.all(np.isfinite(probabilities)):
        return float("nan")
    return float(roc_auc_score(labels, np.round(probabilities / AUC_RESOLUTION) * AUC_RESOLUTION))


def export(
    classifier: keras.Model,
    *,
    fit_files: Sequence[LabelledFile],
    validation: ImageSet,
    keras_probabilities: np.ndarray,
    temperature: float,
    operating_points: OperatingPoints,
    quantization: str = "auto",
    seed: int = 0,
    quantization_aware: FineTuneSettings | None = None,
    intercept: float = 0.0,
) -> ExportResult:
    """Convert, measure every requested quantization on the validation films, gate on parity of probabilities,
    labels at both operating points and AUC, pick one. The served model also outputs the pooled features the input
    gate reads. int8 is calibrated on ``representative_films`` of the fit films; when that post-training int8 fails
    the gate and ``quantization_aware`` asks for epochs, a copy fine-tuned with int8 weights and activations on
    every fit film (and a mild variant of each) to answer as the Keras model does is converted and gated too.
    Probabilities are ``sigmoid(logit / temperature + intercept)``: the intercept is 0 unless a site calibration
    set one."""
    requested = ("float32", "int8") if quantization == "auto" else (quantization,)
    served = serving_model(classifier)
    check = ParityCheck(validation, keras_probabilities, temperature, operating_points, intercept)
    candidates: list[tuple[ExportCandidate, bytes]] = []
    for name in requested:
        representative = (
            representative_films(fit_files, validation.images.shape[1], seed=seed)
            if name == "int8"
            else validation.images[:0]
        )
        float_layers = badly_quantized(layer_errors(served, representative)) if name == "int8" else ()
        candidate, model_bytes = check.convert_and_measure(served, name, representative, float_layers)
        if name == "int8":
            candidate = replace(candidate, method="post-training quantization")
        logger.info("LiteRT %s candidate: %s", name, candidate)
        candidates.append((candidate, model_bytes))
        if name == "int8" and not candidate.passes and quantization_aware and quantization_aware.epochs > 0:
            candidates.append(
                quantization_aware_candidate(
                    classifier,
                    quantization_aware,
                    fit_files=fit_files,
                    representative=representative,
                    check=check,
                    seed=seed,
                )
            )
    passing = [(c, b) for c, b in candidates if c.passes]
    if not passing:
        best = min((c for c, _ in candidates), key=lambda c: c.max_probability_difference)
        raise ParityError(f"no exported model passes the parity gate on validation films: {best.summary()}")
    chosen, chosen_bytes = passing[0]
    for candidate, model_bytes in passing[1:]:
        if candidate.milliseconds_per_image * INT8_MIN_SPEEDUP <= chosen.milliseconds_per_image:
            chosen, chosen_bytes = candidate, model_bytes
    measured = tuple(c for c, _ in candidates)
    float_bytes = next((b for c, b in candidates if c.quantization == "float32"), b"")
    return ExportResult(chosen_bytes, chosen, measured, choice_reason(chosen, measured), float_bytes)


def quantization_aware_candidate(
    classifier: keras.Model,
    settings: FineTuneSettings,
    *,
    fit_files: Sequence[LabelledFile],
    representative: np.ndarray,
    check: ParityCheck,
    seed: int,
) -> tuple[ExportCandidate, bytes]:
    """The int8 candidate of a copy of ``classifier`` fine-tuned quantization-aware on every fit film (and a mild
    variant of each), gated against ``classifier`` itself."""
    size = check.validation.images.shape[1]
    films = representative_films(fit_files, size, count=len(fit_files), seed=seed + 1)
    tuned = serving_model(
        quantization_aware_model(
            classifier, films, representative, check.temperature, settings, intercept=check.intercept
        )
    )
    float_layers = badly_quantized(layer_errors(tuned, representative))
    candidate, model_bytes = check.convert_and_measure(tuned, "int8", representative, float_layers)
    candidate = replace(candidate, method=f"quantization-aware fine-tuning, {settings.description}")
    logger.info("LiteRT int8 candidate: %s", candidate)
    return candidate, model_bytes


@dataclass(frozen=True)
class ParityCheck:
    """What an exported candidate is measured against: the validation films and the Keras model's answers."""

    validation: ImageSet
    keras_probabilities: np.ndarray
    temperature: float
    operating_points: OperatingPoints
    intercept: float = 0.0
    """The calibration's intercept: ``P = sigmoid(logit / temperature + intercept)``."""

    def convert_and_measure(
        self, served: keras.Model, quantization: str, representative: np.ndarray, float_layers: tuple[str, ...]
    ) -> tuple[ExportCandidate, bytes]:
        """One quantization of ``served``, converted and measured on the validation films against Keras."""
        model_bytes = convert(served, quantization, representative, float_layers)
        candidate = measure(
            model_bytes,
            quantization=quantization,
            images=self.validation.images,
            labels=self.validation.labels,
            keras_probabilities=self.keras_probabilities,
            temperature=self.temperature,
            intercept=self.intercept,
            thresholds=(self.operating_points.normal_below, self.operating_points.pneumonia_from),
            float_layers=float_layers,
        )
        return candidate, model_bytes


def choice_reason(chosen: ExportCandidate, candidates: tuple[ExportCandidate, ...]) -> str:
    """Why ``chosen`` is served, with every candidate's figures."""
    others = [c for c in candidates if c is not chosen]
    if not others:
        return f"{chosen.name} was the only quantization requested; {chosen.summary()}"
    parts = [f"{chosen.name} is served; {chosen.summary()}"]
    for other in others:
        if other.failures:
            parts.append(f"{other.name} fails the parity gate: {'; '.join(other.failures)}")
        elif chosen.quantization == "int8":
            parts.append(f"{other.summary()} passes too, and int8 is at least {INT8_MIN_SPEEDUP}x faster")
        else:
            parts.append(
                f"{other.name} passes but is not {INT8_MIN_SPEEDUP}x faster "
                f"({other.milliseconds_per_image:.2f} ms per image)"
            )
    return ". ".join(parts)


def trust_regressions(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Where the input gate and the screening stage of ``after`` (a card) do worse on validation than those of
    ``before``: fewer real films kept, more benign variants refused, fewer conditions refused. Empty when none."""
    regressions: list[str] = []
    if "input_gate" in before:
        kept_before, kept_after = before["input_gate"]["validation_kept"], after["input_gate"]["validation_kept"]
        if kept_after < kept_before:
            regressions.append(f"the input gate keeps {kept_after:.4f} of validation films, was {kept_before:.4f}")
    if "screening" in before:
        old, new = before["screening"]["validation"], after["screening"]["validation"]
        if new["clean_kept"] < old["clean_kept"]:
            regressions.append(f"screening keeps {new['clean_kept']:.4f} of clean films, was {old['clean_kept']:.4f}")
        for kind, share in old["benign_refused"].items():
            if new["benign_refused"][kind] > share:
                regressions.append(f"screening refuses {new['benign_refused'][kind]:.4f} of {kind}, was {share:.4f}")
        for kind, share in old["conditions_refused"].items():
            if new["conditions_refused"][kind] < share:
                regressions.append(
                    f"screening refuses {new['conditions_refused'][kind]:.4f} of {kind}, was {share:.4f}"
                )
    return regressions
