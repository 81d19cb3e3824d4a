"""Export an existing artifact's weights again as int8, by the exporter's rule, as a new version.

The Keras model kept beside the artifact must be that artifact's (its logits match the served float model's on
every validation film). Both quantizations are converted, gated and chosen exactly as training does it
(``training.export``): int8 calibrated on representative fit films with the badly quantizing layers kept float,
then probabilities, far label flips and AUC against Keras on the validation films, and int8 chosen only when it is
also ``INT8_MIN_SPEEDUP`` times faster than the float32 conversion measured beside it. An int8 choice has its input
gate and its screening head fitted again on its own features, as training fits them; it is served only when their
validation figures are no worse than the float artifact's (``trust_regressions``). The card's calibration, operating
points and validation metrics are those of the int8 model as served; the test split is not scored (its figures stay
the float version's, marked so). Published versions are never rewritten: the result is a new version.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

import training.efficientnet_lite  # Registers the custom layers of saved EfficientNet-Lite models.
import training.models  # noqa: F401  # Registers the custom layer of the saved models.
from core.model_card import (
    CARD_FILE,
    EXPLAINER_FILE,
    GATE_FILE,
    MODEL_FILE,
    SCREENING_FILE,
    ServingSpec,
    read_card,
    sha256_of,
    verify_artifact,
    write_card,
)
from core.screening import build_stage
from scoring.classifier import Classifier
from scoring.litert import ClassifierModel
from training.calibration import sigmoid
from training.data import LabelledFile, load_images, split_as_trained
from training.evaluate import score_image_set
from training.export import ExportCandidate, ParityError, export, trust_regressions
from training.gate import fit_input_gate
from training.ledger import git_commit
from training.metrics import evaluate
from training.quantization_aware import FineTuneSettings
from training.screening import fit_screening
from training.train import predict_logits, served_features

logger = logging.getLogger(__name__)

LOGIT_TOLERANCE = 1e-4
"""Largest allowed difference between the Keras model's and the served float model's logits on a validation film."""


class RequantizeError(RuntimeError):
    """The artifact cannot be served as int8: the message says why, with the figures."""


def requantize(
    artifact_dir: Path,
    keras_path: Path,
    data_dir: Path,
    output_dir: Path,
    *,
    quantization_aware_epochs: int = 3,
) -> dict[str, Any]:
    """Write ``output_dir``: the artifact of ``artifact_dir`` served as int8, under a new version; returns its card.
    Raises ``RequantizeError`` (writing nothing) when int8 fails the parity gate or the trust figures. The screening
    head is fitted and measured on as many films as training uses, so its figures compare like for like."""
    verify_artifact(artifact_dir)
    card = read_card(artifact_dir)
    if card["export"]["chosen"] == "int8":
        raise RequantizeError(f"{artifact_dir} is already served as int8")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise RequantizeError(f"{output_dir} is not empty; a new version goes to a new folder")
    fit_files, validation_files, _ = split_as_trained(card, data_dir, RequantizeError)
    spec = ServingSpec.from_card(card)
    validation = load_images(validation_files, size=spec.input_size)
    temperature, intercept, points = spec.temperature, spec.intercept, spec.points

    classifier = keras.saving.load_model(keras_path, compile=False)
    keras_logits = predict_logits(classifier, validation.images)
    float_logits, _ = ClassifierModel(artifact_dir / MODEL_FILE).run_in_batches(validation.images)
    difference = float(np.max(np.abs(keras_logits - float_logits)))
    if not difference <= LOGIT_TOLERANCE:
        raise RequantizeError(
            f"{keras_path}'s logits differ from {card['version']}'s by {difference:.2e} on validation films "
            f"(tolerance {LOGIT_TOLERANCE}): it is not that artifact's model"
        )
    try:
        exported = export(
            classifier,
            fit_files=fit_files,
            validation=validation,
            keras_probabilities=sigmoid(keras_logits, temperature, intercept),
            temperature=temperature,
            intercept=intercept,
            operating_points=points,
            quantization="auto",
            seed=int(card["hyperparameters"]["seed"]),
            quantization_aware=FineTuneSettings(epochs=quantization_aware_epochs),
        )
    except ParityError as error:
        raise RequantizeError(f"{card['version']} stays float: {error}") from error
    int8 = exported.chosen
    if int8.quantization != "int8":
        raise RequantizeError(f"{card['version']} stays float: {exported.reason}")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "artifact"
        shutil.copytree(artifact_dir, folder, ignore=shutil.ignore_patterns(CARD_FILE, "report"))
        (folder / MODEL_FILE).write_bytes(exported.model_bytes)
        new_card = _derived_card(card, folder, int8, exported.to_dict())
        _refit_trust_checks(new_card, folder, fit_files, validation_files)
        regressions = trust_regressions(card, new_card)
        if regressions:
            raise RequantizeError(f"{card['version']} stays float: int8 passes parity but {'; '.join(regressions)}")
        write_card(folder, new_card)
        served = Classifier.from_directory(folder)
        scores = score_image_set(served, validation)
        resamples = int(card["hyperparameters"].get("bootstrap_resamples", 1000))
        new_card["metrics"] = {
            **card["metrics"],
            "validation": evaluate(validation.labels, scores.probabilities, points, resamples).to_dict(),
        }
        new_card["metrics_test_from"] = {
            "version": card["version"],
            "note": "the test split was not scored again for the int8 export: metrics.test, metrics_by_family and "
            "comparison are the float model's",
        }
        write_card(folder, new_card)
        verify_artifact(folder)
        shutil.copytree(folder, output_dir, dirs_exist_ok=True)
    if (artifact_dir / "report").is_dir():
        shutil.copytree(artifact_dir / "report", output_dir / "report", dirs_exist_ok=True)
    return new_card


def _derived_card(card: dict[str, Any], folder: Path, int8: ExportCandidate, export: dict[str, Any]) -> dict[str, Any]:
    """The new version's card before its trust checks: the int8 model file, the export's figures for both
    quantizations and its reason, and where it came from."""
    new_card = dict(card)
    new_card["version"] = f"{card['architecture']}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    new_card["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    new_card["model_sha256"] = sha256_of(folder / MODEL_FILE)
    new_card["model_size_bytes"] = (folder / MODEL_FILE).stat().st_size
    new_card["export"] = export
    new_card["derived_from"] = {
        "version": card["version"],
        "model_sha256": card["model_sha256"],
        "git_commit": git_commit(),
        "change": f"{_int8_origin(int8)} exported as int8 ({int8.summary()}); input gate and screening head "
        "fitted again on the int8 model's features",
        **({"previous": card["derived_from"]} if "derived_from" in card else {}),
    }
    if (folder / EXPLAINER_FILE).is_file():
        # The explainer stays the float network's map: it is checked against the float model it was exported
        # beside (the int8 logits differ from it by up to the parity tolerance, far above the explainer's).
        new_card["explainer"] = {**card["explainer"], "checked_against": f"the float32 model of {card['version']}"}
    return new_card


def _int8_origin(int8: ExportCandidate) -> str:
    """Which weights the int8 model holds, in words."""
    if int8.method.startswith("quantization-aware"):
        return "a copy of the weights fine-tuned, quantization-aware, to answer as the float model does"
    return "the same weights"


def _refit_trust_checks(
    card: dict[str, Any],
    folder: Path,
    fit_files: list[LabelledFile],
    validation_files: list[LabelledFile],
) -> None:
    """Fit the input gate and the screening head on the int8 model's own features, as training does, into
    ``folder`` and ``card``."""
    size = int(card["input"]["size"])
    fit, validation = (load_images(files, size=size) for files in (fit_files, validation_files))
    model_path = folder / MODEL_FILE
    gate = None
    if "input_gate" in card:
        fitted = fit_input_gate(
            served_features(folder, fit), fit.labels, fit.images, served_features(folder, validation), validation.images
        )
        fitted.gate.save(folder / GATE_FILE)
        card["input_gate"] = fitted.card_section(sha256_of(folder / GATE_FILE))
        gate = fitted.gate
    if "screening" in card:
        seed = int(card["hyperparameters"]["seed"])
        screening = fit_screening(model_path, fit_files, validation_files, gate, seed)
        screening.head.save(folder / SCREENING_FILE)
        stage = build_stage(screening.input_size, gate, screening.head)
        card["screening"] = screening.card_section(sha256_of(folder / SCREENING_FILE), stage)
    ServingSpec.from_card(card)  # The card still describes a servable model.
