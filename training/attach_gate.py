"""Give an artifact trained before the input gate existed its gate, as a new version with the same weights.

The Keras model kept beside the artifact is exported again with its pooled features as a second output; the new
model file must give the same logits as the old one on every validation film (so the card's calibration, threshold
and metrics still hold), and the gate is fitted exactly as training fits it: on the fit split, with its threshold
on the validation split, both carved again with the card's seed and share from the same data (the data manifest
must match the card's). The test split is only reported on. The result is a new version: published versions are
never rewritten.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

import training.efficientnet_lite  # Registers the custom layers of saved EfficientNet-Lite models.
import training.models  # noqa: F401  # Registers the custom layer of the saved models.
from core.model_card import EXPLAINER_FILE, GATE_FILE, MODEL_FILE, read_card, sha256_of, verify_artifact, write_card
from scoring.litert import ClassifierModel
from training.data import ImageSet, load_images, split_as_trained
from training.explain import max_logit_difference
from training.export import convert
from training.gate import fit_input_gate, kept_share, serving_model
from training.ledger import git_commit
from training.train import served_features

logger = logging.getLogger(__name__)

LOGIT_TOLERANCE = 1e-4
"""Largest allowed difference between the old and the new model file's logits on a validation film."""


class AttachGateError(RuntimeError):
    """The artifact, its Keras model and the data do not belong together, or the new model differs from the old."""


def attach_gate(artifact_dir: Path, keras_path: Path, data_dir: Path, output_dir: Path) -> dict[str, Any]:
    """Write ``output_dir``: the artifact of ``artifact_dir`` with an input gate, under a new version; returns its
    card."""
    verify_artifact(artifact_dir)
    card = read_card(artifact_dir)
    if "input_gate" in card:
        raise AttachGateError(f"{artifact_dir} already has an input gate")
    fit_files, validation_files, test_files = split_as_trained(card, data_dir, AttachGateError)
    size = int(card["input"]["size"])
    fit, validation, test = (load_images(files, size=size) for files in (fit_files, validation_files, test_files))

    classifier = keras.saving.load_model(keras_path, compile=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / MODEL_FILE
    quantization = card["export"]["chosen"]
    model_path.write_bytes(convert(serving_model(classifier), quantization, validation.images))
    difference = _largest_logit_difference(artifact_dir / MODEL_FILE, model_path, validation)
    if not difference <= LOGIT_TOLERANCE:
        raise AttachGateError(
            f"the re-exported model's logits differ from {card['version']}'s by {difference:.2e} on validation films "
            f"(tolerance {LOGIT_TOLERANCE}): {keras_path} is not that artifact's model"
        )
    fitted = fit_input_gate(
        served_features(output_dir, fit),
        fit.labels,
        fit.images,
        served_features(output_dir, validation),
        validation.images,
    )
    fitted.gate.save(output_dir / GATE_FILE)
    test_kept = kept_share(fitted.gate, test.images, served_features(output_dir, test))

    new_card = dict(card)
    new_card["version"] = f"{card['architecture']}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    new_card["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    new_card["model_sha256"] = sha256_of(model_path)
    new_card["model_size_bytes"] = model_path.stat().st_size
    new_card["derived_from"] = {
        "version": card["version"],
        "model_sha256": card["model_sha256"],
        "git_commit": git_commit(),
        "change": "input gate added; the same weights exported again with the pooled features as a second output",
        "max_logit_difference_on_validation": difference,
    }
    if (artifact_dir / EXPLAINER_FILE).is_file():
        shutil.copyfile(artifact_dir / EXPLAINER_FILE, output_dir / EXPLAINER_FILE)
        explainer = dict(card["explainer"])
        explainer["max_logit_difference"] = max_logit_difference(
            output_dir / EXPLAINER_FILE, model_path, explainer["bias"], validation.images
        )
        new_card["explainer"] = explainer
    if (artifact_dir / "report").is_dir():
        shutil.copytree(artifact_dir / "report", output_dir / "report", dirs_exist_ok=True)
    new_card["input_gate"] = fitted.card_section(sha256_of(output_dir / GATE_FILE), test_kept=test_kept)
    write_card(output_dir, new_card)
    verify_artifact(output_dir)
    return new_card


def _largest_logit_difference(old_model: Path, new_model: Path, images: ImageSet) -> float:
    """The largest difference of the two model files' logits over an image set."""
    old_logits, _ = ClassifierModel(old_model).run_in_batches(images.images)
    new_logits, _ = ClassifierModel(new_model).run_in_batches(images.images)
    return float(np.max(np.abs(old_logits - new_logits)))
