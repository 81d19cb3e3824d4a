"""The model card: the JSON document that travels with every ``model.tflite``.

Training writes it; the scorer reads the fields it serves with (input size, temperature, threshold, class names,
model checksum) and ignores the rest, which is the training record for people.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FILE = "model.tflite"
CARD_FILE = "model_card.json"


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
    model_sha256: str
    test_auc: float | None

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> ServingSpec:
        """Read the serving fields of a card, naming the first one that is missing or malformed."""
        try:
            class_names = tuple(card["class_names"])
            if class_names != ("NORMAL", "PNEUMONIA"):
                raise ModelArtifactError(f"unexpected class names {class_names}")
            test = card.get("metrics", {}).get("test") or {}
            return cls(
                version=str(card["version"]),
                input_size=int(card["input"]["size"]),
                class_names=("NORMAL", "PNEUMONIA"),
                temperature=float(card["calibration"]["temperature"]),
                threshold=float(card["calibration"]["threshold"]),
                model_sha256=str(card["model_sha256"]),
                test_auc=float(test["auc"]["value"]) if "auc" in test else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ModelArtifactError(f"model card is missing or has a malformed field: {error!r}") from error


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


def verify_artifact(directory: Path) -> ServingSpec:
    """Check that the artifact's model file matches the sha256 its card states, and return the serving spec."""
    spec = ServingSpec.from_card(read_card(directory))
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise ModelArtifactError(f"{model_path} does not exist")
    actual = sha256_of(model_path)
    if actual != spec.model_sha256:
        raise ModelArtifactError(f"{model_path} has sha256 {actual}, but its card states {spec.model_sha256}")
    return spec
