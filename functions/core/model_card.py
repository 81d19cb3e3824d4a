"""The model card: the JSON document that travels with every ``model.tflite``.

Training writes it; the scorer reads the fields it serves with (input size, temperature and intercept, operating
points, class names, model checksum, the optional explainer's checksum and bias, the validated population) and
ignores the rest, which is the training record for people. The served probability is
``sigmoid(logit / temperature + intercept)``; the intercept is 0 unless the card says otherwise (only a site
calibration, ``training/site_calibration.py``, moves it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.labels import OperatingPoints
from core.population import DEFAULT_POPULATION, Population

MODEL_FILE = "model.tflite"
CARD_FILE = "model_card.json"
EXPLAINER_FILE = "explain.tflite"
"""The optional class-activation-map model; an artifact has one only when its card has an ``explainer`` section."""
GATE_FILE = "input_gate.npz"
"""The optional input gate's statistics (``core.input_gate``); present only when the card has an ``input_gate``
section."""
SCREENING_FILE = "screening.npz"
"""The optional film-condition head of the screening stage (``core.film_condition``, ``core.screening``); present
only when the card has a ``screening`` section."""


class ModelArtifactError(RuntimeError):
    """A model artifact is missing, unreadable or does not match its card."""


@dataclass(frozen=True)
class ServingSpec:
    """What the scorer needs from a model card."""

    version: str
    input_size: int
    class_names: tuple[str, str]
    temperature: float
    threshold: float
    """The screening point chosen on validation (flagged at or above it)."""
    model_sha256: str
    test_auc: float | None
    explainer_sha256: str | None = None
    """Checksum of ``explain.tflite``; None when the card names no explainer."""
    test_count: int | None = None
    """How many test images ``test_auc`` was measured on."""
    data_manifest_sha256: str | None = None
    """Fingerprint of the exact data the model was trained and evaluated on; equal for comparable AUCs."""
    explainer_bias: float | None = None
    """The logit's bias: ``logit = explainer_bias + mean(map)`` for the explainer's contribution map."""
    gate_sha256: str | None = None
    """Checksum of ``input_gate.npz``; None when the card names no input gate (models trained before it existed)."""
    operating_points: OperatingPoints | None = None
    """Where the labels change; a card written before the INDETERMINATE band gets the band around its threshold."""
    intercept: float = 0.0
    """Added to ``logit / temperature`` before the sigmoid; 0 for every card without one (Platt scaling on the logit
    with slope a and intercept b is temperature 1/a and intercept b)."""

    @property
    def points(self) -> OperatingPoints:
        """The operating points the scorer labels with."""
        return self.operating_points or OperatingPoints.around(self.threshold)

    population: Population = DEFAULT_POPULATION
    """The patients the model was validated on and the ages it accepts; the default for a card without one."""
    screening_sha256: str | None = None
    """Checksum of ``screening.npz``; None when the card names no film-condition head (models trained before it)."""
    screening_figures: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """What the card measured for each check of the screening stage, by check name (for the stage and its logs)."""

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> ServingSpec:
        """Read the serving fields of a card, naming the first one that is missing or malformed."""
        try:
            class_names = tuple(card["class_names"])
            if class_names != ("NORMAL", "PNEUMONIA"):
                raise ModelArtifactError(f"unexpected class names {class_names}")
            test = card.get("metrics", {}).get("test") or {}
            explainer = card.get("explainer")
            if explainer is not None and explainer.get("file", EXPLAINER_FILE) != EXPLAINER_FILE:
                # The file name is fixed, so a card can never point the scorer at another path.
                raise ModelArtifactError(f"the explainer must be {EXPLAINER_FILE}, not {explainer['file']!r}")
            gate = card.get("input_gate")
            if gate is not None and gate.get("file", GATE_FILE) != GATE_FILE:
                raise ModelArtifactError(f"the input gate must be {GATE_FILE}, not {gate['file']!r}")
            calibration = card["calibration"]
            points = calibration.get("operating_points")
            intercept = float(calibration.get("intercept", 0.0))
            if not math.isfinite(intercept):
                raise ModelArtifactError(f"the calibration's intercept must be a finite number, not {intercept}")
            screening = card.get("screening")
            if screening is not None and screening.get("file", SCREENING_FILE) != SCREENING_FILE:
                raise ModelArtifactError(f"the screening head must be {SCREENING_FILE}, not {screening['file']!r}")
            return cls(
                version=str(card["version"]),
                input_size=int(card["input"]["size"]),
                class_names=("NORMAL", "PNEUMONIA"),
                temperature=float(calibration["temperature"]),
                threshold=float(calibration["threshold"]),
                model_sha256=str(card["model_sha256"]),
                test_auc=float(test["auc"]["value"]) if "auc" in test else None,
                explainer_sha256=str(explainer["sha256"]) if explainer is not None else None,
                explainer_bias=float(explainer["bias"]) if explainer is not None else None,
                test_count=int(test["count"]) if "count" in test else None,
                data_manifest_sha256=str(card["data_manifest_sha256"]) if "data_manifest_sha256" in card else None,
                gate_sha256=str(gate["sha256"]) if gate is not None else None,
                operating_points=None
                if points is None
                else OperatingPoints(float(points["normal_below"]), float(points["pneumonia_from"])),
                population=Population.from_card(card.get("population")),
                intercept=intercept,
                screening_sha256=str(screening["sha256"]) if screening is not None else None,
                screening_figures=_check_figures(screening),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelArtifactError(f"model card is missing or has a malformed field: {error!r}") from error
        except AttributeError as error:
            raise ModelArtifactError(
                f"model card has a malformed explainer, input gate, population or screening section: {error!r}"
            ) from error


def _check_figures(screening: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The figures of each check that the card's screening section measured, by check name."""
    if screening is None:
        return {}
    return {str(check["name"]): dict(check.get("figures", {})) for check in screening.get("checks", [])}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(directory: Path) -> dict[str, Any]:
    """Load ``model_card.json`` from an artifact directory."""
    try:
        card: dict[str, Any] = json.loads((directory / CARD_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelArtifactError(f"cannot read {directory / CARD_FILE}: {error}") from error
    return card


def write_card(directory: Path, card: dict[str, Any]) -> None:
    """Write ``model_card.json`` as training does: two-space indents, keys in the order given."""
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def verify_artifact(directory: Path) -> ServingSpec:
    """Check that the artifact's model file (and explainer, input gate and screening head, when the card names
    them) match the sha256 its card states, and return the serving spec."""
    spec = ServingSpec.from_card(read_card(directory))
    verify_file(directory / MODEL_FILE, spec.model_sha256)
    if spec.explainer_sha256 is not None:
        verify_file(directory / EXPLAINER_FILE, spec.explainer_sha256)
    if spec.gate_sha256 is not None:
        verify_file(directory / GATE_FILE, spec.gate_sha256)
    if spec.screening_sha256 is not None:
        verify_file(directory / SCREENING_FILE, spec.screening_sha256)
    return spec


def verify_file(path: Path, expected_sha256: str) -> None:
    """Raise ``ModelArtifactError`` unless ``path`` exists and has the expected sha256."""
    if not path.is_file():
        raise ModelArtifactError(f"{path} does not exist")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ModelArtifactError(f"{path} has sha256 {actual}, but its card states {expected_sha256}")
