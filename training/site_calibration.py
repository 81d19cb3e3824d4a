"""Site calibration: refit a model's calibration on one site's own labelled films, as a new artifact.

Calibration fitted on the training distribution holds there and not elsewhere: on a site whose films the model
over-calls, the error is a shift of the logit, which temperature scaling (a scale) cannot move. A site's labelled
films can. The rule, fixed before any site was scored:

- **Films.** ``DIR/NORMAL`` and ``DIR/PNEUMONIA``; fewer than ``MIN_FILMS_PER_CLASS`` of either class is refused.
- **Split by patient** (``SPLIT_RULE``): within each class, the site's patients (``training.data.patient_id``) are
  ordered by the sha256 of their id and the first half, rounded up, is the *fit part*, the rest the *held-out
  part*; no patient is on both sides and each part holds about half of each class.
- **Recalibration** (``fit_platt``): Platt scaling on the served model's raw logit, ``P = sigmoid(a * logit + b)``,
  fitted on the fit part with Platt's smoothed targets (as scikit-learn's sigmoid calibration does), so a separable
  fit part cannot drive the slope to infinity. It is served as temperature ``1 / a`` and intercept ``b``. The map
  is increasing (a fitted slope that is not positive is refused), so AUC and the order of the films are unchanged.
- **Operating points**: ``training.calibration.choose_operating_points`` on the fit part's recalibrated
  probabilities, the training rule with the fit part in validation's place.
- **Figures**: ``training.metrics.evaluate`` on the held-out part only, for the site-calibrated model and for the
  model as shipped (its own calibration and operating points), with bootstrap 95% intervals.

The new artifact has the same model files (sha256 unchanged), version ``<old version>-site-<UTC time>``, the new
calibration in its card, ``derived_from`` and a ``site_calibration`` section. Its ``metrics`` stay those of the model
it derives from (its own calibration): the test AUC, which promotion compares, holds for both.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from core.labels import OperatingPoints
from core.model_card import (
    EXPLAINER_FILE,
    GATE_FILE,
    MODEL_FILE,
    SCREENING_FILE,
    ServingSpec,
    read_card,
    verify_artifact,
    write_card,
)
from scoring.classifier import Classifier
from training.calibration import OPERATING_POINT_RULE, choose_operating_points, sigmoid
from training.data import CLASS_NAMES, DataLayoutError, LabelledFile, list_split, load_images, manifest_sha256
from training.evaluate import served_logits
from training.ledger import LedgerEntry, git_commit, is_official_test_split, record_scoring
from training.metrics import HEADLINE_METRICS, Evaluation, evaluate, expected_calibration_error, headline

logger = logging.getLogger(__name__)

MIN_FILMS_PER_CLASS = 50
"""The fewest films of each class a site must give."""

SPLIT_RULE = (
    "within each class, the site's patients (patient ids from the file names, training/data.py patient_id; a patient "
    "with films of both classes counts in the class of its first file) ordered by the sha256 of their UTF-8 id; "
    "the first half, rounded up, is the fit part, the rest the held-out part"
)
METHOD = (
    "Platt scaling on the served model's logit, P = sigmoid(slope * logit + intercept), fitted by maximum likelihood "
    "with Platt's smoothed targets on the site's fit part; served as temperature = 1 / slope and the intercept"
)
SITE_OPERATING_POINT_RULE = f"{OPERATING_POINT_RULE}; chosen on the site's fit part (in validation's place)"
SITE_REPORT = Path("report") / "site_calibration"
"""Where the held-out part's plots go inside the new artifact (the rest of ``report/`` is the old artifact's)."""
MANIFEST_SPLIT = "site"
"""The split name of every line of a site's data manifest (``training.data.manifest_sha256``)."""


class SiteCalibrationError(RuntimeError):
    """The site's films cannot support a calibration (too few, one class on a side, unreadable), or the output
    folder is taken. Messages are fixed texts, counts and the folders given: no film's file name reaches them."""


@dataclass(frozen=True)
class PlattScaling:
    """``P = sigmoid(slope * logit + intercept)``."""

    slope: float
    intercept: float

    @property
    def temperature(self) -> float:
        """The card's temperature: ``logit / temperature`` is ``slope * logit``."""
        return 1.0 / self.slope

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Recalibrated P(pneumonia) of raw logits, computed as the scorer computes it."""
        return sigmoid(logits, self.temperature, self.intercept)

    def to_dict(self) -> dict[str, float]:
        return {"slope": self.slope, "intercept": self.intercept, "temperature": self.temperature}


def fit_platt(labels: np.ndarray, logits: np.ndarray) -> PlattScaling:
    """Platt scaling of raw logits: maximum likelihood of ``sigmoid(slope * logit + intercept)`` against Platt's
    (1999) smoothed targets, (N+ + 1) / (N+ + 2) for a positive and 1 / (N- + 2) for a negative."""
    labels = np.asarray(labels, dtype=int)
    values = np.asarray(logits, dtype=np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise SiteCalibrationError("the fit part needs films of both classes")
    targets = np.where(labels == 1, (positives + 1) / (positives + 2), 1.0 / (negatives + 2))

    def loss_and_gradient(parameters: np.ndarray) -> tuple[float, np.ndarray]:
        scores = parameters[0] * values + parameters[1]
        loss = -np.sum(targets * log_expit(scores) + (1.0 - targets) * log_expit(-scores))
        residuals = expit(scores) - targets
        return float(loss), np.array([np.sum(residuals * values), np.sum(residuals)])

    result = minimize(loss_and_gradient, x0=np.array([1.0, 0.0]), jac=True, method="BFGS", options={"gtol": 1e-8})
    slope, intercept = (float(value) for value in result.x)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope <= 0.0:
        raise SiteCalibrationError(
            "the site's labels do not rise with the model's logit (the fitted slope is not positive): this model "
            "cannot be recalibrated for the site"
        )
    return PlattScaling(slope=slope, intercept=intercept)


def patient_digest(patient: str) -> str:
    """The sha256 of a patient id (UTF-8, hex): the order of the split rule."""
    return hashlib.sha256(patient.encode("utf-8")).hexdigest()


def split_by_patient(files: Sequence[LabelledFile]) -> tuple[list[LabelledFile], list[LabelledFile]]:
    """(fit part, held-out part) by ``SPLIT_RULE``: every film of a patient lands on the same side."""
    patients: dict[str, int] = {}
    for item in files:
        patients.setdefault(item.patient_id, item.label)
    fit_patients: set[str] = set()
    for label in range(len(CLASS_NAMES)):
        ordered = sorted((patient for patient, first in patients.items() if first == label), key=patient_digest)
        fit_patients.update(ordered[: (len(ordered) + 1) // 2])
    return [f for f in files if f.patient_id in fit_patients], [f for f in files if f.patient_id not in fit_patients]


def class_counts(files: Sequence[LabelledFile]) -> dict[str, int]:
    """How many films of each class."""
    return {name: sum(f.label == index for f in files) for index, name in enumerate(CLASS_NAMES)}


def check_enough_films(files: Sequence[LabelledFile], min_per_class: int) -> None:
    """Refuse a site with fewer than ``min_per_class`` films of either class."""
    counts = class_counts(files)
    if min(counts.values()) < min_per_class:
        raise SiteCalibrationError(
            f"the site has {counts['NORMAL']} NORMAL and {counts['PNEUMONIA']} PNEUMONIA films; site calibration "
            f"needs at least {min_per_class} of each"
        )


def check_both_classes(files: Sequence[LabelledFile], part: str) -> None:
    """Refuse a part of the split that lacks a class (a class whose films all come from one patient)."""
    for name, count in class_counts(files).items():
        if count == 0:
            raise SiteCalibrationError(
                f"the {part} part has no {name} films: the site's {name} films must come from at least two patients"
            )


@dataclass(frozen=True)
class SiteCalibration:
    """What a site calibration fitted and measured."""

    platt: PlattScaling
    points: OperatingPoints
    films: dict[str, dict[str, int]]
    """Films per class of the fit and held-out parts."""
    patients: dict[str, int]
    """Patients of the fit and held-out parts."""
    fit_calibration_error: float
    """Expected calibration error of the recalibrated model on the fit part (in-sample, for reference)."""
    held_out: Evaluation
    """The site-calibrated model on the held-out part."""
    held_out_as_shipped: Evaluation
    """The model as shipped (its card's calibration and operating points) on the same held-out part."""


def fit_site_calibration(
    spec: ServingSpec,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    fit_mask: np.ndarray,
    patients: dict[str, int],
    resamples: int = 1000,
) -> SiteCalibration:
    """Fit Platt scaling and the operating points on the fit part (``fit_mask``) of served logits; measure both the
    recalibrated and the shipped model on the rest."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    fit_mask = np.asarray(fit_mask, dtype=bool)
    held_mask = ~fit_mask
    platt = fit_platt(labels[fit_mask], logits[fit_mask])
    fit_probabilities = platt.probabilities(logits[fit_mask])
    points = choose_operating_points(labels[fit_mask], fit_probabilities)
    held_out = evaluate(labels[held_mask], platt.probabilities(logits[held_mask]), points, resamples)
    shipped = sigmoid(logits[held_mask], spec.temperature, spec.intercept)
    return SiteCalibration(
        platt=platt,
        points=points,
        films={
            "fit": _counts_of(labels[fit_mask]),
            "held_out": _counts_of(labels[held_mask]),
        },
        patients=patients,
        fit_calibration_error=expected_calibration_error(labels[fit_mask], fit_probabilities),
        held_out=held_out,
        held_out_as_shipped=evaluate(labels[held_mask], shipped, spec.points, resamples),
    )


def _counts_of(labels: np.ndarray) -> dict[str, int]:
    return {name: int((labels == index).sum()) for index, name in enumerate(CLASS_NAMES)}


def headline_with_intervals(figures: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The headline figures of an evaluation (``Evaluation.to_dict()``) with their bootstrap 95% intervals,
    rounded to four places."""
    return {
        name: {bound: round(float(figures[name][bound]), 4) for bound in ("value", "low", "high")}
        for name in HEADLINE_METRICS
    }


def summary(card: dict[str, Any]) -> dict[str, Any]:
    """What ``pneumoscan calibrate`` prints of a site-calibrated card: the new version, what it derives from, the
    fitted parameters and operating points, and both models' held-out figures."""
    site = card["site_calibration"]
    return {
        "version": card["version"],
        "derived_from": card["derived_from"]["version"],
        "films": site["films"],
        "patients": site["patients"],
        "parameters": site["parameters"],
        "operating_points": card["calibration"]["operating_points"],
        "held_out": {name: headline_with_intervals(figures) for name, figures in site["held_out"].items()},
    }


def site_card(
    card: dict[str, Any],
    calibration: SiteCalibration,
    *,
    data_manifest: str,
    official_test_split: bool,
    min_per_class: int,
    created: datetime,
    commit: str,
) -> dict[str, Any]:
    """The derived artifact's card: the old card with the site's calibration, ``derived_from`` and a
    ``site_calibration`` section."""
    new_card = dict(card)
    new_card["version"] = f"{card['version']}-site-{created:%Y%m%dT%H%M%SZ}"
    new_card["created_at"] = created.isoformat(timespec="seconds")
    new_card["output"] = "PNEUMONIA logit; probability = sigmoid(logit / temperature + intercept)"
    new_card["calibration"] = {
        "method": "Platt scaling on the logit, fitted on a site's films (see site_calibration)",
        "temperature": calibration.platt.temperature,
        "intercept": calibration.platt.intercept,
        # The screening point: a film at or above it is flagged (INDETERMINATE or PNEUMONIA).
        "threshold": calibration.points.normal_below,
        "operating_points": calibration.points.to_dict(),
        "operating_point_rule": SITE_OPERATING_POINT_RULE,
    }
    derived_from: dict[str, Any] = {
        "version": card["version"],
        "model_sha256": card["model_sha256"],
        "git_commit": commit,
        "change": "site calibration: the same model files, a calibration and operating points fitted on a site's films",
        "calibration": card["calibration"],
    }
    if "derived_from" in card:
        derived_from["derived_from"] = card["derived_from"]
    new_card["derived_from"] = derived_from
    new_card["site_calibration"] = {
        "method": METHOD,
        "parameters": calibration.platt.to_dict(),
        "split_rule": SPLIT_RULE,
        "operating_point_rule": SITE_OPERATING_POINT_RULE,
        "min_films_per_class": min_per_class,
        "data_manifest_sha256": data_manifest,
        "official_test_split": official_test_split,
        "films": calibration.films,
        "patients": calibration.patients,
        "fit": {"expected_calibration_error": calibration.fit_calibration_error},
        "held_out": {
            "site_calibrated": calibration.held_out.to_dict(),
            "as_shipped": calibration.held_out_as_shipped.to_dict(),
        },
        "metrics_note": (
            "metrics are derived_from's, under its own calibration; its test AUC holds for this model too (the "
            "recalibration is an increasing map of the logit), its other figures do not: this calibration's are "
            "under held_out"
        ),
    }
    return new_card


def calibrate_site(
    artifact_dir: Path,
    site_dir: Path,
    output_dir: Path,
    min_per_class: int = MIN_FILMS_PER_CLASS,
    resamples: int = 1000,
) -> dict[str, Any]:
    """Score a site's labelled films with the artifact's served model, fit the site's calibration and write it to
    ``output_dir`` as a new artifact; returns the new card. A scoring of the official test split is recorded in the
    holdout ledger."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise SiteCalibrationError(f"{output_dir} is not an empty folder: an artifact is written once, to a new folder")
    try:
        files = list_split(site_dir)
    except DataLayoutError as error:
        raise SiteCalibrationError(str(error)) from error
    check_enough_films(files, min_per_class)
    fit_files, held_files = split_by_patient(files)
    check_both_classes(fit_files, "fit")
    check_both_classes(held_files, "held-out")

    classifier = Classifier.from_directory(artifact_dir)
    card = read_card(artifact_dir)
    try:
        images = load_images(files, size=classifier.input_size)
    except DataLayoutError as error:
        raise SiteCalibrationError("some of the site's films cannot be read or decoded (--debug names them)") from error
    logits = served_logits(classifier, images)
    in_fit_part = set(fit_files)
    fit_mask = np.array([item in in_fit_part for item in files])
    patients = {
        "fit": len({f.patient_id for f in fit_files}),
        "held_out": len({f.patient_id for f in held_files}),
    }
    spec = classifier.spec
    calibration = fit_site_calibration(
        spec, logits, images.labels, fit_mask=fit_mask, patients=patients, resamples=resamples
    )
    logger.info(
        "site calibration: slope %.4f, intercept %.4f, operating points %s",
        calibration.platt.slope,
        calibration.platt.intercept,
        calibration.points,
    )
    official = is_official_test_split(site_dir)
    commit = git_commit()
    new_card = site_card(
        card,
        calibration,
        data_manifest=manifest_sha256({MANIFEST_SPLIT: files}),
        official_test_split=official,
        min_per_class=min_per_class,
        created=datetime.now(UTC),
        commit=commit,
    )
    if official:
        record_scoring(_ledger_entry(card["version"], new_card["version"], calibration, commit))
    held = ~fit_mask
    write_site_artifact(
        artifact_dir,
        output_dir,
        new_card,
        spec,
        HeldOutScores(
            labels=images.labels[held],
            shipped=sigmoid(logits[held], spec.temperature, spec.intercept),
            recalibrated=calibration.platt.probabilities(logits[held]),
        ),
    )
    return new_card


def _ledger_entry(old_version: str, version: str, calibration: SiteCalibration, commit: str) -> LedgerEntry:
    """The holdout ledger's line for a site calibration on the official test split."""
    fit_count = sum(calibration.films["fit"].values())
    held_count = sum(calibration.films["held_out"].values())
    shipped = headline(calibration.held_out_as_shipped.to_dict())
    return LedgerEntry(
        run="pneumoscan calibrate",
        version=version,
        count=fit_count + held_count,
        figures=headline(calibration.held_out.to_dict()),
        git_commit=commit,
        note=(
            f"site calibration of {old_version} with the official test split as a new site: fitted on {fit_count} "
            f"films, figures of the other {held_count} (held-out part); as shipped on that part: AUC {shipped['auc']}, "
            f"ECE {shipped['expected_calibration_error']}, sensitivity {shipped['sensitivity']}, specificity "
            f"{shipped['specificity']}"
        ),
    )


@dataclass(frozen=True)
class HeldOutScores:
    """The held-out part's labels and P(pneumonia) of the shipped and the site-calibrated model."""

    labels: np.ndarray
    shipped: np.ndarray
    recalibrated: np.ndarray


def write_site_artifact(
    artifact_dir: Path, output_dir: Path, new_card: dict[str, Any], spec: ServingSpec, held_out: HeldOutScores
) -> None:
    """Copy the served files and the old report into ``output_dir``, add the held-out part's plots, write the new
    card last and verify the folder as the scorer will (every file's sha256 against the card)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [MODEL_FILE]
    names += [EXPLAINER_FILE] if spec.explainer_sha256 is not None else []
    names += [GATE_FILE] if spec.gate_sha256 is not None else []
    names += [SCREENING_FILE] if spec.screening_sha256 is not None else []
    for name in names:
        shutil.copyfile(artifact_dir / name, output_dir / name)
    if (artifact_dir / "report").is_dir():
        shutil.copytree(artifact_dir / "report", output_dir / "report", dirs_exist_ok=True)
    write_site_plots(output_dir / SITE_REPORT, held_out, float(new_card["calibration"]["threshold"]))
    write_card(output_dir, new_card)
    verify_artifact(output_dir)


def write_site_plots(report_dir: Path, held_out: HeldOutScores, threshold: float) -> None:
    """The held-out part's plots: reliability of the shipped and the site-calibrated model, and the site-calibrated
    model's ROC and confusion matrix at its screening point."""
    # matplotlib loads here, once there is something to plot: a refused site never pays for it.
    from training.report import plot_confusion_matrix, plot_reliability, plot_roc  # noqa: PLC0415

    report_dir.mkdir(parents=True, exist_ok=True)
    labels = held_out.labels
    plot_reliability(
        {"as shipped": (labels, held_out.shipped), "site-calibrated": (labels, held_out.recalibrated)},
        report_dir / "reliability.png",
    )
    plot_roc(labels, held_out.recalibrated, "site held-out part", report_dir / "roc.png")
    plot_confusion_matrix(labels, held_out.recalibrated, threshold, report_dir / "confusion_matrix.png")
