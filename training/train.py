"""The training job: data -> fit -> calibrate -> export with parity gate -> evaluate what is served -> card.

Only validation data (carved from train at patient level) chooses anything: early stopping, the temperature,
the threshold and the LiteRT quantization. The test split is read once, at the end, for the report.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from scoring.classifier import Classifier
from scoring.model_card import MODEL_FILE, sha256_of, write_card
from training.calibration import TARGET_SENSITIVITY, choose_threshold, fit_temperature, sigmoid
from training.config import TrainingConfig
from training.data import (
    CLASS_NAMES,
    ImageSet,
    class_weights,
    limit_per_class,
    list_split,
    load_images,
    manifest_sha256,
    patient_level_split,
)
from training.evaluate import ArtifactScores, score_image_set, write_split_plots
from training.explain import export_explainer
from training.export import export
from training.metrics import evaluate
from training.models import build_classifier, build_ensemble, build_training_model
from training.report import plot_learning_curves

logger = logging.getLogger(__name__)

KERAS_FILE = "model.keras"
"""The Keras model is kept beside the artifact for comparisons; only the LiteRT model is served."""


@dataclass(frozen=True)
class DataSplits:
    """Where the training and test images are."""

    train_dir: Path
    test_dir: Path


def train_and_export(splits: DataSplits, output_dir: Path, config: TrainingConfig) -> dict[str, Any]:
    """Run the whole job and write ``model.tflite``, ``explain.tflite`` (for architectures that have a class
    activation map), ``model_card.json`` and ``report/`` to ``output_dir``."""
    started = time.monotonic()
    source_commit = git_commit()  # Read before the long run, so later edits to the tree cannot be recorded.
    keras.utils.set_random_seed(config.seed)
    train_files = limit_per_class(list_split(splits.train_dir), config.limit_per_class)
    test_files = limit_per_class(list_split(splits.test_dir), config.limit_per_class)
    fit_files, validation_files = patient_level_split(train_files, config.validation_fraction, config.seed)
    fit_set = load_images(fit_files, size=config.image_size)
    validation_set = load_images(validation_files, size=config.image_size)
    logger.info("fit %s, validation %s", fit_set.class_counts(), validation_set.class_counts())

    members: list[keras.Model] = []
    histories: list[dict[str, list[float]]] = []
    for member in range(config.ensemble_size):
        logger.info("training ensemble member %d of %d", member + 1, config.ensemble_size)
        keras.utils.set_random_seed(config.seed + member)
        member_model = build_classifier(config.architecture, config.image_size, config.dropout, config.weights)
        histories.append(fit(member_model, fit_set, validation_set, config, seed=config.seed + member))
        members.append(member_model)
    classifier = build_ensemble(members)

    validation_logits = classifier.predict(validation_set.images, batch_size=64, verbose=0).reshape(-1)
    temperature = fit_temperature(validation_set.labels, validation_logits)
    keras_probabilities = sigmoid(validation_logits, temperature)
    threshold = choose_threshold(validation_set.labels, keras_probabilities)
    logger.info("temperature %.4f, threshold %.4f", temperature, threshold)

    exported = export(
        classifier,
        validation_images=validation_set.images,
        keras_probabilities=keras_probabilities,
        temperature=temperature,
        threshold=threshold,
        quantization=config.quantization,
        seed=config.seed,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / MODEL_FILE).write_bytes(exported.model_bytes)
    # The explainer is checked against the LiteRT model just written, on validation images only.
    explainer = export_explainer(
        classifier, output_dir, served_model=output_dir / MODEL_FILE, images=validation_set.images
    )
    classifier.save(output_dir / KERAS_FILE)
    version = f"{config.architecture}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    card: dict[str, Any] = {
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": source_commit,
        "data_manifest_sha256": manifest_sha256({"train": train_files, "test": test_files}),
        "model_sha256": sha256_of(output_dir / MODEL_FILE),
        "model_size_bytes": len(exported.model_bytes),
        "input": {"size": config.image_size, "channels": 1, "dtype": "uint8", "layout": "NHWC", "color": "grayscale"},
        "output": "PNEUMONIA logit; probability = sigmoid(logit / temperature)",
        "class_names": list(CLASS_NAMES),
        "architecture": config.architecture,
        "parameters": int(classifier.count_params()),
        "calibration": {
            "method": "temperature scaling fitted on validation",
            "temperature": temperature,
            "threshold": threshold,
            "threshold_rule": f"highest validation threshold with sensitivity >= {TARGET_SENSITIVITY}",
        },
        "export": exported.to_dict(),
        **({"explainer": explainer} if explainer is not None else {}),
        "data": {
            "fit": fit_set.class_counts(),
            "validation": validation_set.class_counts(),
            "validation_patients": len({f.patient_id for f in validation_files}),
            "validation_rule": (
                f"patient-level stratified {config.validation_fraction:.0%} of train, seed {config.seed}"
            ),
        },
        "hyperparameters": config.to_dict(),
        "ensemble_size": config.ensemble_size,
        "epochs_run": [len(history["loss"]) for history in histories],
    }
    write_card(output_dir, card)

    # From here on the served artifact itself is measured, never the Keras model.
    served = Classifier.from_directory(output_dir)
    validation_scores = score_image_set(served, validation_set)
    test_set = load_images(test_files, size=config.image_size)
    test_scores = score_image_set(served, test_set)
    card["metrics"] = {
        split: evaluate(scores.labels, scores.probabilities, threshold, config.bootstrap_resamples).to_dict()
        for split, scores in (("validation", validation_scores), ("test", test_scores))
    }
    card["data"]["test"] = test_set.class_counts()
    write_report(output_dir / "report", histories, validation_scores, test_scores, threshold)
    card["training_seconds"] = round(time.monotonic() - started, 1)
    write_card(output_dir, card)
    return card


def fit(
    classifier: keras.Model, fit_set: ImageSet, validation_set: ImageSet, config: TrainingConfig, seed: int
) -> dict[str, list[float]]:
    """Train with AdamW and a warm-up + cosine schedule; keep the weights of the best validation AUC."""
    steps_per_epoch = int(np.ceil(len(fit_set) / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 20,
        decay_steps=config.epochs * steps_per_epoch,
        warmup_target=config.learning_rate,
        warmup_steps=steps_per_epoch,
    )
    model = build_training_model(classifier, seed)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
    )
    training_data = (
        tf.data.Dataset.from_tensor_slices((fit_set.images, fit_set.labels.astype("float32")))
        .shuffle(len(fit_set), seed=seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    validation_data = (validation_set.images, validation_set.labels.astype("float32"))
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
    )
    history = model.fit(
        training_data,
        validation_data=validation_data,
        validation_batch_size=64,
        epochs=config.epochs,
        class_weight=class_weights(fit_set.labels),
        callbacks=[early_stopping],
        verbose=2,
    )
    return {name: [float(v) for v in values] for name, values in history.history.items()}


def write_report(
    report_dir: Path,
    histories: list[dict[str, list[float]]],
    validation_scores: ArtifactScores,
    test_scores: ArtifactScores,
    threshold: float,
) -> None:
    """Every plot of the report folder."""
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(histories, report_dir / "learning_curves.png")
    write_split_plots(report_dir, "test", test_scores, threshold, reference=validation_scores)
    (report_dir / "history.json").write_text(json.dumps(histories, indent=1))


def git_commit() -> str:
    """The source commit, from the build's environment or the working tree; 'unknown' outside both."""
    if commit := os.environ.get("PNEUMOSCAN_GIT_COMMIT"):
        return commit
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # git is looked up on PATH on purpose.
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()
