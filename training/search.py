"""A bounded hyper-parameter search for the training recipe, judged on validation and its stress suite only.

Optuna's TPE sampler chooses the augmentation strength, the label smoothing and the fine-tuning learning rate.
Each trial is a short run at a reduced input size (the head's warm-up on cached features, then a few epochs of
fine-tuning on augmented films); it is judged by the mean balanced accuracy at P(pneumonia) = 0.5 over the clean
validation films and every variant of the validation stress suite (``training.stress``), which rewards a model
whose calls survive framing and encoding changes. The test split is never read. The search stops at its trial
count or its time budget, whichever comes first, and the winner's values are what a full run then uses.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
from sklearn.metrics import roc_auc_score

from training.config import TrainingConfig
from training.data import ImageSet, limit_per_class, list_split, load_images, patient_level_split
from training.models import build_classifier
from training.stress import StressSet, build_stress_set, stress_figures

logger = logging.getLogger(__name__)

SEARCHED = ("augmentation_strength", "label_smoothing", "learning_rate")
"""The hyper-parameters the search chooses; everything else comes from the base recipe."""


@dataclass(frozen=True)
class SearchSettings:
    """The search's bounds: trials, wall time and the reduced size of each trial's run."""

    trials: int = 10
    minutes: float = 75.0
    image_size: int = 128
    epochs: int = 3
    seed: int = 42


@dataclass(frozen=True)
class TrialResult:
    """One trial's values and validation figures."""

    number: int
    augmentation_strength: float
    label_smoothing: float
    learning_rate: float
    objective: float
    validation_auc: float
    clean_balanced_accuracy: float
    worst_variant: str
    worst_balanced_accuracy: float
    mean_same_call: float
    seconds: float


@dataclass(frozen=True)
class SearchReport:
    """Every trial and the winner's values."""

    settings: SearchSettings
    trials: list[TrialResult]
    best: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "objective": "mean balanced accuracy at P(pneumonia) = 0.5 over clean validation and its stress suite",
            "trials": [asdict(trial) for trial in self.trials],
            "best": self.best,
        }

    def table(self) -> str:
        """The trials as a Markdown table, best first."""
        return trials_table([asdict(trial) for trial in self.trials])


def trials_table(trials: list[dict[str, Any]]) -> str:
    """Trials (``TrialResult`` as dictionaries) as a Markdown table, best first."""
    lines = [
        "| trial | augmentation | label smoothing | learning rate | objective | val AUC | worst variant | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for trial in sorted(trials, key=lambda t: -float(t["objective"])):
        lines.append(
            f"| {trial['number']} | {trial['augmentation_strength']:.2f} | {trial['label_smoothing']:.3f} | "
            f"{trial['learning_rate']:.1e} | {trial['objective']:.4f} | {trial['validation_auc']:.4f} | "
            f"{trial['worst_variant']} {trial['worst_balanced_accuracy']:.3f} | {trial['seconds']:.0f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class SearchData:
    """The decoded fit and validation films and the validation stress suite, at the trials' size."""

    fit: ImageSet
    validation: ImageSet
    stress: StressSet


def load_search_data(train_dir: Path, config: TrainingConfig, size: int) -> SearchData:
    """Fit and validation exactly as a full run splits them (patient level, the config's share and seed)."""
    files = limit_per_class(list_split(train_dir), config.limit_per_class)
    fit_files, validation_files = patient_level_split(files, config.validation_fraction, config.seed)
    validation = load_images(validation_files, size=size)
    return SearchData(
        fit=load_images(fit_files, size=size),
        validation=validation,
        stress=build_stress_set(validation.files, size),
    )


def run_search(train_dir: Path, base: TrainingConfig, settings: SearchSettings, output_dir: Path) -> SearchReport:
    """Search, write ``search.json`` and ``search.md`` to ``output_dir``, and return the report."""
    # The teacher's training code is imported here: it imports this module's callers' dependencies.
    from training.train import DecodedSplits, fit, freeze_batch_norm, predict_logits, warm_up_head  # noqa: PLC0415

    data = load_search_data(train_dir, base, settings.image_size)
    logger.info("search data: fit %d, validation %d", len(data.fit), len(data.validation))
    splits = DecodedSplits(fit=data.fit, validation=data.validation, test=data.validation)
    results: list[TrialResult] = []

    def objective(trial: optuna.Trial) -> float:
        started = time.monotonic()
        config = replace(
            base,
            image_size=settings.image_size,
            epochs=settings.epochs,
            augmentation_strength=trial.suggest_float("augmentation_strength", 0.2, 1.0),
            label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.15),
            learning_rate=trial.suggest_float("learning_rate", 3e-5, 3e-4, log=True),
        )
        keras.utils.set_random_seed(settings.seed)
        classifier = build_classifier(config.architecture, config.image_size, config.dropout, config.weights)
        if config.pretrained and config.head_epochs > 0:
            warm_up_head(classifier, splits, config)
            freeze_batch_norm(classifier)
        targets = data.fit.labels.astype(np.float32)
        fit(classifier, data.fit.images, targets, splits, config, learning_rate=config.learning_rate,
            epochs=config.epochs, seed_offset=0)  # fmt: skip
        result = judge(
            trial.number, config, classifier, data, predict=predict_logits, seconds=time.monotonic() - started
        )
        results.append(result)
        logger.info("trial %d: %s", trial.number, result)
        keras.backend.clear_session()
        return result.objective

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=settings.seed))
    study.optimize(objective, n_trials=settings.trials, timeout=settings.minutes * 60)
    best = {name: float(study.best_params[name]) for name in SEARCHED}
    report = SearchReport(settings, results, best)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "search.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (output_dir / "search.md").write_text(report.table() + "\n")
    return report


def judge(
    number: int, config: TrainingConfig, classifier: keras.Model, data: SearchData, *, predict: Any, seconds: float
) -> TrialResult:
    """A trial's figures on validation and the stress suite; the objective is their mean balanced accuracy."""
    labels = data.validation.labels
    clean_logits = predict(classifier, data.validation.images)
    clean = stress_figures(labels, clean_logits, clean_logits)
    figures = {
        variant: stress_figures(labels, clean_logits, predict(classifier, images))
        for variant, images in data.stress.variants.items()
    }
    worst = min(figures, key=lambda variant: figures[variant].balanced_accuracy)
    balanced = [clean.balanced_accuracy] + [f.balanced_accuracy for f in figures.values()]
    return TrialResult(
        number=number,
        augmentation_strength=config.augmentation_strength,
        label_smoothing=config.label_smoothing,
        learning_rate=config.learning_rate,
        objective=float(np.mean(balanced)),
        validation_auc=float(roc_auc_score(labels, clean_logits)),
        clean_balanced_accuracy=clean.balanced_accuracy,
        worst_variant=worst,
        worst_balanced_accuracy=figures[worst].balanced_accuracy,
        mean_same_call=float(np.mean([f.same_call for f in figures.values()])),
        seconds=round(seconds, 1),
    )
