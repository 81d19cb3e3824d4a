"""Give an artifact trained before the screening stage's film-condition head its head, as a new version.

The model file is not touched (the head reads the pooled features the model with an input gate already outputs),
so the card's calibration still holds; a card written before the INDETERMINATE band gets its operating points
written out and its metrics measured again as served (``remeasure_with_operating_points``: the one time this reads
the test split, recorded in the holdout ledger). The head is fitted exactly as training fits it: on
variants of the fit split, with its threshold on the validation split, both carved again with the card's seed and
share from the same data (the data manifest must match the card's). The result is a new version: published
versions are never rewritten.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.input_gate import InputGate
from core.model_card import (
    CARD_FILE,
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
from training.calibration import OPERATING_POINT_RULE
from training.data import LabelledFile, load_images, split_as_trained
from training.evaluate import score_image_set
from training.ledger import LedgerEntry, git_commit, record_scoring
from training.metrics import evaluate, headline
from training.screening import FIT_FILMS, fit_screening

logger = logging.getLogger(__name__)


class AttachScreeningError(RuntimeError):
    """The artifact already has a head, cannot have one, or the data is not the data it was trained on."""


def attach_screening(
    artifact_dir: Path,
    data_dir: Path,
    output_dir: Path,
    *,
    fit_films: int = FIT_FILMS,
    validation_films: int | None = None,
) -> dict[str, Any]:
    """Write ``output_dir``: the artifact of ``artifact_dir`` with a film-condition head, under a new version;
    returns its card. ``fit_films`` and ``validation_films`` make it smaller for tests."""
    verify_artifact(artifact_dir)
    card = read_card(artifact_dir)
    if "screening" in card:
        raise AttachScreeningError(f"{artifact_dir} already has a screening head")
    if ClassifierModel(artifact_dir / MODEL_FILE).feature_count is None:
        raise AttachScreeningError(
            f"{artifact_dir}'s model has no pooled features output; give it an input gate first (attach-gate)"
        )
    if output_dir.exists() and any(output_dir.iterdir()):
        raise AttachScreeningError(f"{output_dir} is not empty; a new version goes to a new folder")
    hyperparameters = card["hyperparameters"]
    fit_files, validation_files, test_files = split_as_trained(card, data_dir, AttachScreeningError)

    shutil.copytree(artifact_dir, output_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CARD_FILE))
    gate = InputGate.load(output_dir / GATE_FILE) if "input_gate" in card else None
    fitted = fit_screening(
        output_dir / MODEL_FILE,
        fit_files,
        validation_files,
        gate,
        hyperparameters["seed"],
        fit_films=fit_films,
        validation_films=validation_films,
    )
    fitted.head.save(output_dir / SCREENING_FILE)
    stage = build_stage(fitted.input_size, gate, fitted.head)

    new_card = dict(card)
    new_card["version"] = f"{card['architecture']}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    new_card["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    new_card["derived_from"] = {
        "version": card["version"],
        "model_sha256": card["model_sha256"],
        "git_commit": git_commit(),
        "change": "screening stage's film-condition head added; the model file is unchanged",
        **({"previous": card["derived_from"]} if "derived_from" in card else {}),
    }
    new_card["screening"] = fitted.card_section(sha256_of(output_dir / SCREENING_FILE), stage)
    if "operating_points" not in card["calibration"]:
        remeasure_with_operating_points(new_card, output_dir, validation_files, test_files)
    write_card(output_dir, new_card)
    Classifier.from_directory(output_dir)  # The new artifact loads: checksums, feature counts, the head's classes.
    return new_card


def remeasure_with_operating_points(
    card: dict[str, Any], folder: Path, validation: list[LabelledFile], test: list[LabelledFile]
) -> None:
    """Give a card written before the INDETERMINATE band its operating points (the band between its threshold and
    0.5, as the scorer already serves it) and its metrics as served: screening figures at ``normal_below``. This
    scores the test split, so the scoring goes into the holdout ledger."""
    spec = ServingSpec.from_card(card)
    points = spec.points
    card["calibration"] = {
        **card["calibration"],
        "operating_points": points.to_dict(),
        "operating_point_rule": OPERATING_POINT_RULE,
    }
    classifier = Classifier(folder / MODEL_FILE, spec)
    resamples = int(card["hyperparameters"].get("bootstrap_resamples", 1000))
    metrics: dict[str, Any] = {}
    for split, files in (("validation", validation), ("test", test)):
        images = load_images(files, size=spec.input_size)
        scores = score_image_set(classifier, images)
        metrics[split] = evaluate(images.labels, scores.probabilities, points, resamples).to_dict()
    card["metrics_before_operating_points"] = card.get("metrics")
    card["metrics"] = metrics
    record_scoring(
        LedgerEntry(
            run="pneumoscan attach-screening",
            version=str(card["version"]),
            count=int(metrics["test"]["count"]),
            figures=headline(metrics["test"]),
            git_commit=git_commit(),
            note="the release re-measured as served with INDETERMINATE (screening figures at normal_below)",
        )
    )
