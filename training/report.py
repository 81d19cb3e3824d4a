"""PNG plots for the artifact's ``report/``: learning curves, ROC, confusion matrix, reliability diagram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Training runs headless, in containers and CI.

import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from training.data import CLASS_NAMES


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
