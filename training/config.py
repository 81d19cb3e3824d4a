"""Hyper-parameters of a training run, from flags or SageMaker's ``hyperparameters.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from training.models import ARCHITECTURES

QUANTIZATIONS = ("auto", "float32", "int8")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what a training run produces; recorded in the model card."""

    architecture: str = "compact"
    image_size: int = 160
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    dropout: float = 0.3
    validation_fraction: float = 0.15
    patience: int = 10
    seed: int = 42
    weights: str | None = None
    ensemble_size: int = 3
    quantization: str = "auto"
    limit_per_class: int | None = None
    """Use at most this many images per class and split: for smoke runs, never for a release."""
    bootstrap_resamples: int = 1000

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.image_size < 32 or min(self.epochs, self.batch_size, self.ensemble_size) < 1:
            raise ValueError("image_size must be >= 32; epochs, batch_size and ensemble_size >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainingConfig:
        """A copy with values (possibly SageMaker's strings) converted to each field's type."""
        known = {f.name: f for f in fields(self)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s): {', '.join(sorted(unknown))}")
        converted: dict[str, Any] = {}
        for name, raw in overrides.items():
            default = getattr(self, name)
            if raw is None or raw in {"", "None", "none", "null"}:
                converted[name] = None
            elif isinstance(default, bool):
                converted[name] = str(raw).lower() in {"1", "true", "yes"}
            elif isinstance(default, int) or name == "limit_per_class":
                converted[name] = int(raw)
            elif isinstance(default, float):
                converted[name] = float(raw)
            else:
                converted[name] = str(raw)
        return replace(self, **converted)


def read_hyperparameters(path: Path) -> dict[str, Any]:
    """SageMaker's hyper-parameters (every value a string), or nothing when the file does not exist."""
    if not path.is_file():
        return {}
    values: dict[str, Any] = json.loads(path.read_text())
    # SageMaker adds its own bookkeeping keys, which are not hyper-parameters of this job.
    return {key: value for key, value in values.items() if not key.startswith("sagemaker_")}
