"""The training job: data -> teacher (head warm-up, fine-tuning) -> student distilled from it -> calibrate ->
export with parity gate -> choose what is served -> evaluate the artifacts as served -> cards.

Only validation data (carved from train at patient level) chooses anything: early stopping, the temperature,
the threshold and the LiteRT quantization; the served model is chosen by the serving budget. The test split is
decoded up front, so a bad file fails early, and scored once, at the end, for the report.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from core.labels import OperatingPoints
from core.model_card import (
    GATE_FILE,
    MODEL_FILE,
    SCREENING_FILE,
    ServingSpec,
    sha256_of,
    verify_artifact,
    write_card,
)
from core.population import DEFAULT_POPULATION
from core.screening import build_stage
from scoring.classifier import Classifier
from scoring.litert import ClassifierModel
from training.augment import AugmentationSettings, augment_film
from training.calibration import OPERATING_POINT_RULE, choose_operating_points, fit_temperature, sigmoid
from training.config import TrainingConfig
from training.data import (
    CLASS_NAMES,
    ImageSet,
    LabelledFile,
    class_weights,
    image_family,
    limit_per_class,
    list_split,
    load_images,
    manifest_sha256,
    patient_level_split,
)
from training.distill import ServingChoice, choose_served, soft_targets
from training.efficientnet_lite import imagenet_weights_provenance
from training.evaluate import ArtifactScores, score_image_set
from training.explain import export_explainer
from training.export import ExportResult, export, trust_regressions
from training.gate import FittedGate, fit_input_gate, kept_share
from training.ledger import LedgerEntry, git_commit, record_scoring
from training.metrics import evaluate, family_breakdown, headline
from training.models import build_classifier, build_ensemble, is_backbone_layer
from training.quantization_aware import FineTuneSettings
from training.report import write_report
from training.screening import fit_screening
from training.screening import kept_share as stage_kept_share
from training.search import trials_table
from training.stress import build_stress_set, served_stress_figures, stress_table
from training.weight_interpolation import fine_tuned_weights, interpolate_weights

logger = logging.getLogger(__name__)

KERAS_FILE = "model.keras"
"""The Keras model is kept beside the artifact for comparisons; only the LiteRT model is served."""


@dataclass(frozen=True)
class DataSplits:
    """Where the training and test images are."""

    train_dir: Path
    test_dir: Path


@dataclass(frozen=True)
class SplitFiles:
    """The files of one run: fit and validation carved from train at patient level, and the test split."""

    fit: list[LabelledFile]
    validation: list[LabelledFile]
    test: list[LabelledFile]


@dataclass(frozen=True)
class DecodedSplits:
    """The decoded images of every split at one input size."""

    fit: ImageSet
    validation: ImageSet
    test: ImageSet


@dataclass(frozen=True)
class TrainedModel:
    """One trained, calibrated and exported network (the teacher or the student)."""

    role: str
    architecture: str
    classifier: keras.Model
    splits: DecodedSplits
    histories: list[dict[str, list[float]]]
    temperature: float
    operating_points: OperatingPoints
    exported: ExportResult


def train_and_export(
    splits: DataSplits, output_dir: Path, config: TrainingConfig, search: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the whole job: the teacher, the student distilled from it, and the served artifact. ``search`` is the
    report of the recipe search (``training.search``) whose winner ``config`` holds, recorded in the card.

    ``output_dir`` receives ``model.tflite``, ``explain.tflite`` (for architectures with a class activation map),
    ``model_card.json`` and ``report/`` of the served model; the model not served is written, complete, to
    ``output_dir/alternatives/<role>/`` so the two can be compared side by side."""
    started = time.monotonic()
    source_commit = git_commit()  # Read before the long run, so later edits to the tree cannot be recorded.
    keras.utils.set_random_seed(config.seed)
    train_files = limit_per_class(list_split(splits.train_dir), config.limit_per_class)
    test_files = limit_per_class(list_split(splits.test_dir), config.limit_per_class)
    fit_files, validation_files = patient_level_split(train_files, config.validation_fraction, config.seed)
    files = SplitFiles(fit=fit_files, validation=validation_files, test=test_files)
    sizes = {config.image_size} | ({config.student_image_size} if config.student_architecture else set())
    # Every image, the test split's included, is decoded and checked before training starts, so an unreadable
    # file fails the job now rather than after an hour. The test pixels are not looked at until the very end.
    decoded = {size: decode_splits(files, size) for size in sorted(sizes)}
    teacher_splits = decoded[config.image_size]
    logger.info("fit %s, validation %s", teacher_splits.fit.class_counts(), teacher_splits.validation.class_counts())

    teacher = train_teacher(teacher_splits, config)
    student = None
    if config.student_architecture is not None:
        student = train_student(teacher, config.student_architecture, decoded[config.student_image_size], config)
    choice = choose_served(
        config.serve,
        teacher_milliseconds=teacher.exported.chosen.milliseconds_per_image,
        teacher_bytes=len(teacher.exported.model_bytes),
        has_student=student is not None,
    )
    logger.info("serving the %s: %s", choice.served, choice.reason)
    trained = {"teacher": teacher, **({"student": student} if student is not None else {})}
    served = trained[choice.served]  # choose_served names the student only when there is one.

    version = f"{served.architecture}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    context = CardContext(
        version=version,
        source_commit=source_commit,
        manifest=manifest_sha256({"train": train_files, "test": test_files}),
        files=files,
        config=config,
        choice=choice,
        teacher=teacher,
        student=student,
        search=search,
    )
    # From here on the exported artifacts themselves are measured, never the Keras models. The test split is
    # scored here, once, for the report.
    artifacts = [(served, output_dir)]
    artifacts += [(model, output_dir / "alternatives" / role) for role, model in trained.items() if model is not served]
    evaluations = {model.role: write_artifact(model, folder, context) for model, folder in artifacts}
    elapsed = round(time.monotonic() - started, 1)
    cards = {}
    for model, folder in artifacts:
        evaluation = evaluations[model.role]
        cards[model.role] = build_card(
            model,
            context,
            evaluations,
            training_seconds=elapsed,
            explainer=evaluation.explainer,
            input_gate=evaluation.input_gate,
            screening=evaluation.screening,
        )
        write_card(folder, cards[model.role])
        verify_artifact(folder)  # The files on disk are the ones the card describes.
    return cards[served.role]


def decode_splits(files: SplitFiles, size: int) -> DecodedSplits:
    """Decode every split through the shared preprocessing at one input size."""
    return DecodedSplits(
        fit=load_images(files.fit, size=size),
        validation=load_images(files.validation, size=size),
        test=load_images(files.test, size=size),
    )


def train_teacher(splits: DecodedSplits, config: TrainingConfig) -> TrainedModel:
    """Train the teacher (an ensemble of ``ensemble_size`` networks) on the labels, then calibrate and export."""
    targets = splits.fit.labels.astype(np.float32)
    members: list[keras.Model] = []
    histories: list[dict[str, list[float]]] = []
    for member in range(config.ensemble_size):
        logger.info("training teacher member %d of %d", member + 1, config.ensemble_size)
        keras.utils.set_random_seed(config.seed + member)
        classifier = build_classifier(config.architecture, config.image_size, config.dropout, config.weights)
        if config.pretrained and config.head_epochs > 0:
            histories.append(warm_up_head(classifier, splits, config))
            freeze_batch_norm(classifier)
        before_fine_tuning = classifier.get_weights()
        if config.fine_tuned_model is not None:
            logger.info("taking the fine-tuned weights from %s", config.fine_tuned_model)
            classifier.set_weights(fine_tuned_weights(classifier, Path(config.fine_tuned_model)))
        else:
            histories.append(
                fit(
                    classifier,
                    splits.fit.images,
                    targets,
                    splits,
                    config,
                    learning_rate=config.learning_rate,
                    epochs=config.epochs,
                    seed_offset=member,
                )
            )
        if config.weight_interpolation < 1.0:
            logger.info("serving %.2f of the fine-tuned weights (WiSE-FT)", config.weight_interpolation)
            classifier.set_weights(
                interpolate_weights(before_fine_tuning, classifier.get_weights(), config.weight_interpolation)
            )
        members.append(classifier)
    teacher = build_ensemble(members)
    return calibrate_and_export("teacher", config.architecture, teacher, splits, histories=histories, config=config)


def train_student(
    teacher: TrainedModel, architecture: str, splits: DecodedSplits, config: TrainingConfig
) -> TrainedModel:
    """Distil the teacher into a student of ``architecture``: targets from the teacher's calibrated logits on the
    fit images."""
    teacher_logits = predict_logits(teacher.classifier, teacher.splits.fit.images)
    targets = soft_targets(
        splits.fit.labels,
        teacher_logits,
        calibration_temperature=teacher.temperature,
        weight=config.distillation_weight,
        temperature=config.distillation_temperature,
    )
    logger.info("training the %s student on the teacher's soft targets", architecture)
    keras.utils.set_random_seed(config.seed)
    classifier = build_classifier(architecture, config.student_image_size, config.dropout)
    history = fit(
        classifier,
        splits.fit.images,
        targets,
        splits,
        config,
        learning_rate=config.student_learning_rate,
        epochs=config.student_epochs,
        seed_offset=0,
    )
    return calibrate_and_export("student", architecture, classifier, splits, histories=[history], config=config)


def calibrate_and_export(
    role: str,
    architecture: str,
    classifier: keras.Model,
    splits: DecodedSplits,
    *,
    histories: list[dict[str, list[float]]],
    config: TrainingConfig,
) -> TrainedModel:
    """Fit the temperature and threshold on validation, then convert to LiteRT behind the parity gate."""
    validation_logits = predict_logits(classifier, splits.validation.images)
    temperature = fit_temperature(splits.validation.labels, validation_logits)
    keras_probabilities = sigmoid(validation_logits, temperature)
    points = choose_operating_points(splits.validation.labels, keras_probabilities)
    logger.info("%s: temperature %.4f, operating points %s", role, temperature, points)
    exported = export(
        classifier,
        fit_files=splits.fit.files,
        validation=splits.validation,
        keras_probabilities=keras_probabilities,
        temperature=temperature,
        operating_points=points,
        quantization=config.quantization,
        seed=config.seed,
        quantization_aware=FineTuneSettings(epochs=config.quantization_aware_epochs),
    )
    return TrainedModel(role, architecture, classifier, splits, histories, temperature, points, exported)


def predict_logits(classifier: keras.Model, images: np.ndarray) -> np.ndarray:
    """The classifier's logits of a batch of images, flattened."""
    return predict_features(classifier, images).reshape(-1)


def warm_up_head(classifier: keras.Model, splits: DecodedSplits, config: TrainingConfig) -> dict[str, list[float]]:
    """Train the logit unit alone on cached features of the frozen pretrained backbone.

    A randomly initialised head would send large gradients into the pretrained weights during fine-tuning; on
    two CPU cores the features of every image are computed once, and the head then trains in seconds."""
    pool = classifier.get_layer("pool")
    extractor = keras.Model(classifier.inputs, pool.output)
    fit_features = predict_features(extractor, splits.fit.images)
    validation_features = predict_features(extractor, splits.validation.images)
    head_input = keras.Input(shape=fit_features.shape[1:], name="features")
    unit = classifier.get_layer("pneumonia_logit")
    head = keras.Model(head_input, unit(layers.Dropout(config.dropout)(head_input)), name="head")
    head.compile(
        optimizer=keras.optimizers.AdamW(config.head_learning_rate, weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
    )
    history = head.fit(
        fit_features,
        splits.fit.labels.astype(np.float32),
        sample_weight=sample_weights(splits.fit.labels),
        validation_data=(validation_features, splits.validation.labels.astype(np.float32)),
        batch_size=config.batch_size,
        epochs=config.head_epochs,
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=5, restore_best_weights=True)],
        verbose=2,
    )
    # The unit is shared with the classifier, so its trained weights are already in place there.
    return {f"head_{name}": [float(v) for v in values] for name, values in history.history.items()}


def predict_features(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """A model's outputs for a batch of images, as a 2-D float32 array."""
    return np.asarray(model.predict(images, batch_size=64, verbose=0), dtype=np.float32).reshape(len(images), -1)


def freeze_batch_norm(classifier: keras.Model) -> None:
    """Keep the backbone's batch-norm statistics: with small batches, re-estimating them hurts fine-tuning."""
    for layer in classifier.layers:
        if isinstance(layer, layers.BatchNormalization) and is_backbone_layer(layer):
            layer.trainable = False


def sample_weights(labels: np.ndarray) -> np.ndarray:
    """Each image's inverse-frequency class weight, so both classes count equally in the loss."""
    weights = class_weights(labels)
    return np.array([weights[int(label)] for label in labels], dtype=np.float32)


@keras.saving.register_keras_serializable(package="pneumoscan")
class HardLabelAUC(keras.metrics.AUC):  # type: ignore[misc]  # Keras ships no type information.
    """AUC against the targets rounded at 0.5: the true labels, both for labels and for a student's soft targets
    (while the true label's share of a target is at least half, which the default distillation weight keeps)."""

    def update_state(self, y_true, y_pred, sample_weight=None):  # type: ignore[no-untyped-def]  # Keras tensors.
        hard_labels = keras.ops.cast(keras.ops.greater_equal(y_true, 0.5), "float32")
        return super().update_state(hard_labels, y_pred, sample_weight=sample_weight)


def fit(
    classifier: keras.Model,
    images: np.ndarray,
    targets: np.ndarray,
    splits: DecodedSplits,
    config: TrainingConfig,
    *,
    learning_rate: float,
    epochs: int,
    seed_offset: int,
) -> dict[str, list[float]]:
    """Train on ``targets`` (labels, or a student's soft targets) with AdamW and a warm-up + cosine schedule, on
    acquisition-augmented films (``training.augment``), weighting classes by the true labels and smoothing the
    targets by ``config.label_smoothing``; keep the weights of the best validation AUC."""
    seed = config.seed + seed_offset
    steps_per_epoch = int(np.ceil(len(images) / config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate / 20,
        decay_steps=epochs * steps_per_epoch,
        warmup_target=learning_rate,
        warmup_steps=steps_per_epoch,
    )
    classifier.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
        metrics=[HardLabelAUC(from_logits=True, name="auc")],
    )
    augmentation = AugmentationSettings(config.augmentation_strength)
    training_data = (
        tf.data.Dataset.from_tensor_slices((images, targets.astype("float32"), sample_weights(splits.fit.labels)))
        .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        .map(
            lambda image, target, weight: (augment_film(image, augmentation), target, weight),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .batch(config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    validation_data = (splits.validation.images, splits.validation.labels.astype("float32"))
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
    )
    history = classifier.fit(
        training_data,
        validation_data=validation_data,
        validation_batch_size=64,
        epochs=epochs,
        callbacks=[early_stopping],
        verbose=2,
    )
    return {name: [float(v) for v in values] for name, values in history.history.items()}


@dataclass(frozen=True)
class CardContext:
    """What every card of one run shares."""

    version: str
    source_commit: str
    manifest: str
    files: SplitFiles
    config: TrainingConfig
    choice: ServingChoice
    teacher: TrainedModel
    student: TrainedModel | None
    search: dict[str, Any] | None = None


@dataclass(frozen=True)
class ArtifactEvaluation:
    """An exported artifact's metrics on validation and test, overall and per image family."""

    architecture: str
    metrics: dict[str, dict[str, Any]]
    by_family: dict[str, dict[str, dict[str, float]]]
    explainer: dict[str, Any] | None
    """The card's explainer section, None for an architecture without a class activation map."""
    input_gate: dict[str, Any] | None = None
    """The card's input gate section, None for a model without a pooled features output."""
    stress_suite: list[dict[str, Any]] | None = None
    """The validation stress suite through the served artifact (``training.stress``)."""
    screening: dict[str, Any] | None = None
    """The card's screening section (the film-condition head), None for a model without a pooled features output."""


def write_artifact(model: TrainedModel, folder: Path, context: CardContext) -> ArtifactEvaluation:
    """Write one model's artifact folder and measure the artifact, exactly as served, on validation and test."""
    folder.mkdir(parents=True, exist_ok=True)
    model = trust_checked(model, context.config.seed)
    (folder / MODEL_FILE).write_bytes(model.exported.model_bytes)
    explainer = write_explainer(model, folder)
    model.classifier.save(folder / KERAS_FILE)
    fitted = fit_artifact_gate(folder / MODEL_FILE, model.splits)
    gate = fitted.gate if fitted is not None else None
    gate_section = None
    screening_section = None
    head = None
    if fitted is not None:
        fitted.gate.save(folder / GATE_FILE)
        test_features = served_features(folder, model.splits.test) if context.config.evaluate_test else None
        test_kept = None
        if test_features is not None:
            test_kept = kept_share(fitted.gate, model.splits.test.images, test_features)
        gate_section = fitted.card_section(sha256_of(folder / GATE_FILE), test_kept=test_kept)
        # The screening stage's film-condition head, on the same model's features; measured with the gate.
        screening = fit_screening(
            folder / MODEL_FILE, model.splits.fit.files, model.splits.validation.files, gate, context.config.seed
        )
        head = screening.head
        head.save(folder / SCREENING_FILE)
        stage = build_stage(screening.input_size, gate, head)
        stage_kept = None
        if test_features is not None:
            stage_kept = stage_kept_share(stage, model.splits.test.images, test_features)
        screening_section = screening.card_section(sha256_of(folder / SCREENING_FILE), stage, test_kept=stage_kept)
    # The served classifier: the model file just written, with the temperature and threshold its card will hold.
    # The card itself is written once, with the metrics, when every artifact of the run has been measured.
    card = build_card(model, context, explainer=explainer, input_gate=gate_section, screening=screening_section)
    served = Classifier(folder / MODEL_FILE, ServingSpec.from_card(card), gate=gate, head=head)
    scores: dict[str, ArtifactScores] = {}
    metrics: dict[str, dict[str, Any]] = {}
    by_family: dict[str, dict[str, dict[str, float]]] = {}
    splits = [("validation", model.splits.validation)]
    if context.config.evaluate_test:
        splits.append(("test", model.splits.test))
    for split, image_set in splits:
        scores[split] = score_image_set(served, image_set)
        metrics[split] = evaluate(
            image_set.labels,
            scores[split].probabilities,
            model.operating_points,
            context.config.bootstrap_resamples,
        ).to_dict()
        if split == "test":
            record_scoring(
                LedgerEntry(
                    run="pneumoscan train",
                    version=str(card["version"]),
                    count=len(image_set),
                    figures=headline(metrics[split]),
                    git_commit=context.source_commit,
                    note=f"{model.role} of the run; limit_per_class={context.config.limit_per_class}",
                )
            )
        families = [image_family(item.path.name) for item in image_set.files]
        by_family[split] = family_breakdown(
            families, image_set.labels, scores[split].probabilities, model.operating_points.normal_below
        )
    write_report(folder / "report", model.histories, scores, model.operating_points.normal_below)
    # The stress suite is built from validation films only, at this model's input size, and screened as served.
    stress_rows = served_stress_figures(
        served,
        model.splits.validation.images,
        build_stress_set(model.splits.validation.files, int(model.splits.validation.images.shape[1])),
    )
    (folder / "report" / "stress_suite.md").write_text(stress_table(stress_rows) + "\n")
    if context.search is not None:
        (folder / "report" / "search.md").write_text(trials_table(context.search["trials"]) + "\n")
    return ArtifactEvaluation(
        model.architecture,
        metrics,
        by_family,
        explainer,
        gate_section,
        stress_suite=[row.to_dict() for row in stress_rows],
        screening=screening_section,
    )


def write_explainer(model: TrainedModel, folder: Path) -> dict[str, Any] | None:
    """The explainer, checked against the LiteRT model just written, on validation images only; the float explainer
    of an int8 model against its float32 twin (the int8 logits differ by up to the parity tolerance)."""
    if model.exported.chosen.quantization != "int8":
        return export_explainer(
            model.classifier, folder, served_model=folder / MODEL_FILE, images=model.splits.validation.images
        )
    with tempfile.TemporaryDirectory() as scratch:
        reference = Path(scratch) / MODEL_FILE
        reference.write_bytes(model.exported.float_bytes)
        explainer = export_explainer(
            model.classifier, folder, served_model=reference, images=model.splits.validation.images
        )
    if explainer is not None:
        explainer["checked_against"] = "the float32 candidate of this export"
    return explainer


def trust_checked(model: TrainedModel, seed: int) -> TrainedModel:
    """``model``, or for an int8 choice whose input gate and screening head, fitted on its own features, do worse
    on validation than those fitted on the float32 candidate's, ``model`` served as float32 instead."""
    if model.exported.chosen.quantization != "int8" or not model.exported.float_bytes:
        return model
    sections: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, model_bytes in (("float32", model.exported.float_bytes), ("int8", model.exported.model_bytes)):
            folder = Path(scratch) / name
            folder.mkdir()
            (folder / MODEL_FILE).write_bytes(model_bytes)
            fitted = fit_artifact_gate(folder / MODEL_FILE, model.splits)
            if fitted is None:
                return model
            screening = fit_screening(
                folder / MODEL_FILE, model.splits.fit.files, model.splits.validation.files, fitted.gate, seed
            )
            stage = build_stage(screening.input_size, fitted.gate, screening.head)
            sections[name] = {
                "input_gate": fitted.card_section(""),
                "screening": screening.card_section("", stage),
            }
    regressions = trust_regressions(sections["float32"], sections["int8"])
    if not regressions:
        return model
    logger.info("%s: int8 passes parity but its trust checks do worse: %s", model.role, regressions)
    why = f"int8 passes parity, but fitted on its features {'; '.join(regressions)}"
    return replace(model, exported=model.exported.fall_back(why))


def fit_artifact_gate(model_path: Path, splits: DecodedSplits) -> FittedGate | None:
    """Fit the input gate on the exported model's own pooled features of the fit films (threshold on validation);
    None when the model has no features output."""
    if ClassifierModel(model_path).feature_count is None:
        return None
    folder = model_path.parent
    return fit_input_gate(
        served_features(folder, splits.fit),
        splits.fit.labels,
        splits.fit.images,
        served_features(folder, splits.validation),
        splits.validation.images,
    )


def served_features(folder: Path, images: ImageSet) -> np.ndarray:
    """The pooled features of an image set as the exported model in ``folder`` computes them."""
    _, features = ClassifierModel(folder / MODEL_FILE).run_in_batches(images.images)
    if features is None:
        raise ValueError(f"{folder / MODEL_FILE} has no pooled features output")
    return features


def build_card(
    model: TrainedModel,
    context: CardContext,
    evaluations: dict[str, ArtifactEvaluation] | None = None,
    *,
    training_seconds: float | None = None,
    explainer: dict[str, Any] | None = None,
    input_gate: dict[str, Any] | None = None,
    screening: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of one artifact; with ``evaluations``, its metrics and the side-by-side comparison."""
    config = context.config
    size = int(model.splits.validation.images.shape[1])
    served = context.choice.served == model.role
    card: dict[str, Any] = {
        "version": context.version if served else f"{context.version}-{model.role}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": context.source_commit,
        "data_manifest_sha256": context.manifest,
        "model_sha256": hashlib.sha256(model.exported.model_bytes).hexdigest(),
        "model_size_bytes": len(model.exported.model_bytes),
        "input": {"size": size, "channels": 1, "dtype": "uint8", "layout": "NHWC", "color": "grayscale"},
        "output": "PNEUMONIA logit; probability = sigmoid(logit / temperature)",
        "class_names": list(CLASS_NAMES),
        "architecture": model.architecture,
        "role": model.role,
        "parameters": int(model.classifier.count_params()),
        "calibration": {
            "method": "temperature scaling fitted on validation",
            "temperature": model.temperature,
            # The screening point: a film at or above it is flagged (INDETERMINATE or PNEUMONIA).
            "threshold": model.operating_points.normal_below,
            "operating_points": model.operating_points.to_dict(),
            "operating_point_rule": OPERATING_POINT_RULE,
        },
        "export": model.exported.to_dict(),
        "serving": {"served": context.choice.served, "rule": context.choice.reason},
        "data": {
            "fit": model.splits.fit.class_counts(),
            "validation": model.splits.validation.class_counts(),
            "test": model.splits.test.class_counts(),
            "validation_patients": len({f.patient_id for f in context.files.validation}),
            "validation_rule": (
                f"patient-level stratified {config.validation_fraction:.0%} of train's patients, seed {config.seed}"
            ),
        },
        # Who the model is validated on, and the stated patient ages the scorer accepts (core.population).
        "population": DEFAULT_POPULATION.to_card(),
        "hyperparameters": config.to_dict(),
        "ensemble_size": config.ensemble_size if model.role == "teacher" else 1,
        "epochs_run": [len(next(iter(history.values()))) for history in model.histories],
    }
    if config.pretrained:
        card["backbone"] = {
            "name": "EfficientNet-Lite0, ImageNet-1k",
            **imagenet_weights_provenance().to_dict(),
            **({"distilled_into_this_model": True} if model.role == "student" else {}),
        }
    if context.student is not None:
        card["distillation"] = {
            "teacher": context.teacher.architecture,
            "student": context.student.architecture,
            "teacher_share_of_target": config.distillation_weight,
            "temperature": config.distillation_temperature,
            "targets": "teacher's calibrated logits softened by the temperature, on the fit images",
        }
    if context.search is not None:
        card["search"] = context.search
    if explainer is not None:
        card["explainer"] = explainer
    if input_gate is not None:
        card["input_gate"] = input_gate
    if screening is not None:
        card["screening"] = screening
    if evaluations is not None:
        own = evaluations[model.role]
        card["metrics"] = own.metrics
        if own.stress_suite is not None:
            card["stress_suite"] = {
                "split": "validation",
                "rule": "each validation film as a file in every variant of training.stress, screened as served",
                "variants": own.stress_suite,
            }
        card["metrics_by_family"] = own.by_family
        card["comparison"] = {
            role: {
                "architecture": evaluation.architecture,
                **{split: headline(metrics) for split, metrics in evaluation.metrics.items()},
                "validation_by_family": evaluation.by_family["validation"],
            }
            for role, evaluation in evaluations.items()
        }
    if training_seconds is not None:
        card["training_seconds"] = training_seconds
    return card
