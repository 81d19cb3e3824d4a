"""Evaluate an exported artifact, exactly as it is served, on a labelled split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scoring.classifier import Classifier
from training.calibration import sigmoid
from training.data import ImageSet, limit_per_class, list_split, load_images
from training.metrics import Evaluation, evaluate


@dataclass(frozen=True)
class ArtifactScores:
    """Calibrated PNEUMONIA probabilities of the served model on one split."""

    labels: np.ndarray
    probabilities: np.ndarray


def score_image_set(classifier: Classifier, images: ImageSet, batch_size: int = 64) -> ArtifactScores:
    """Run the LiteRT model over an image set and apply the card's calibration (temperature and intercept)."""
    spec = classifier.spec
    logits = served_logits(classifier, images, batch_size)
    return ArtifactScores(labels=images.labels, probabilities=sigmoid(logits, spec.temperature, spec.intercept))


def served_logits(classifier: Classifier, images: ImageSet, batch_size: int = 64) -> np.ndarray:
    """The LiteRT model's raw PNEUMONIA logits over an image set, in batches."""
    return np.concatenate(
        [classifier.logits(images.images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def evaluate_artifact(
    artifact_dir: Path, split_dir: Path, resamples: int = 1000, limit: int | None = None
) -> tuple[Evaluation, ArtifactScores]:
    """Metrics of the artifact in ``artifact_dir`` on the labelled images of ``split_dir`` at the card's threshold."""
    classifier = Classifier.from_directory(artifact_dir)
    files = limit_per_class(list_split(split_dir), limit)
    scores = score_image_set(classifier, load_images(files, size=classifier.input_size))
    return evaluate(scores.labels, scores.probabilities, classifier.spec.points, resamples), scores
