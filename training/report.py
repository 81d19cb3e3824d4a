"""The artifact's ``report/``: learning curves, ROC, confusion matrix and reliability diagram as PNG, and the
training history as JSON. This module owns every file of the report."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Training runs headless, in containers and CI.

import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from training.data import CLASS_NAMES
from training.evaluate import ArtifactScores


def plot_learning_curves(histories: list[dict[str, list[float]]], path: Path) -> None:
    """Training and validation loss and AUC per epoch, one colour per ensemble member."""
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in ((loss_axis, "loss"), (auc_axis, "auc")):
        for member, history in enumerate(histories):
            colour = f"C{member}"
            for prefix, style in (("", "-"), ("val_", "--")):
                if prefix + metric in history:
                    split = "validation" if prefix else "training"
                    axis.plot(history[prefix + metric], style, color=colour, label=f"{split} (member {member + 1})")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, split: str, path: Path) -> None:
    """ROC curve of calibrated probabilities with its AUC."""
    figure, axis = plt.subplots(figsize=(5, 5))
    RocCurveDisplay.from_predictions(labels, probabilities, name=f"pneumoscan ({split})", ax=axis)
    axis.plot([0, 1], [0, 1], ":", color="grey")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_confusion_matrix(labels: np.ndarray, probabilities: np.ndarray, threshold: float, path: Path) -> None:
    """Counts of true and predicted classes at the decision threshold."""
    figure, axis = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay.from_predictions(
        labels, (probabilities >= threshold).astype(int), display_labels=list(CLASS_NAMES), ax=axis, colorbar=False
    )
    axis.set_title(f"threshold {threshold:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 10) -> None:
    """Observed PNEUMONIA frequency against predicted probability, one line per split."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for split, (labels, probabilities) in curves.items():
        observed, predicted = calibration_curve(labels, probabilities, n_bins=bins, strategy="uniform")
        axis.plot(predicted, observed, "o-", label=split)
    axis.set_xlabel("predicted PNEUMONIA probability")
    axis.set_ylabel("observed PNEUMONIA frequency")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    report_dir: Path,
    histories: list[dict[str, list[float]]],
    scores: dict[str, ArtifactScores],
    threshold: float,
) -> None:
    """Every plot of the report folder: learning curves, and the test split's plots beside validation."""
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(histories, report_dir / "learning_curves.png")
    split = "test" if "test" in scores else "validation"
    reference = scores["validation"] if split == "test" else None
    write_split_plots(report_dir, split, scores[split], threshold, reference=reference)
    (report_dir / "history.json").write_text(json.dumps(histories, indent=1))


def write_split_plots(
    report_dir: Path, split: str, scores: ArtifactScores, threshold: float, reference: ArtifactScores | None = None
) -> None:
    """ROC, confusion matrix and reliability diagram of one split (beside a reference split, if given)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(scores.labels, scores.probabilities, split, report_dir / f"roc_{split}.png")
    plot_confusion_matrix(scores.labels, scores.probabilities, threshold, report_dir / f"confusion_matrix_{split}.png")
    curves = {split: (scores.labels, scores.probabilities)}
    if reference is not None:
        curves = {"validation": (reference.labels, reference.probabilities), **curves}
    plot_reliability(curves, report_dir / "reliability.png")
