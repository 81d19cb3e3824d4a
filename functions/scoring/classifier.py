"""Scoring preprocessed images with the LiteRT interpreter, the calibration of the model card and its screening stage
(the source resolution check, the input gate and the film-condition checks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.film_condition import ConditionHead, ConditionHeadError
from core.input_gate import InputGate
from core.labels import Label, OperatingPoints
from core.model_card import (
    EXPLAINER_FILE,
    GATE_FILE,
    MODEL_FILE,
    SCREENING_FILE,
    ModelArtifactError,
    ServingSpec,
    verify_artifact,
    verify_file,
)
from core.rejections import InvalidImageError
from core.screening import Films, ScreeningStage, build_stage
from scoring.explainer import Explainer
from scoring.litert import ClassifierModel


@dataclass(frozen=True)
class Prediction:
    """The calibrated verdict on one image."""

    label: Label
    confidence: float
    """Calibrated probability of ``label`` (of the likelier class for INDETERMINATE); never below 0.5."""
    pneumonia_probability: float
    operating_points: OperatingPoints
    model_version: str


class Classifier:
    """A verified model artifact loaded into a LiteRT interpreter, scoring batches of preprocessed images."""

    def __init__(
        self,
        model_path: Path,
        spec: ServingSpec,
        num_threads: int = 1,
        *,
        directory: Path | None = None,
        gate: InputGate | None = None,
        head: ConditionHead | None = None,
    ) -> None:
        """``directory`` is the artifact folder the explainer is loaded from; without it there is no explainer.
        Without a ``gate`` or a film-condition ``head`` (artifacts made before they existed) the screening stage has
        only the checks it can run."""
        self.spec = spec
        self.directory = directory
        self.gate = gate
        self.head = head
        self._num_threads = num_threads
        self._model = ClassifierModel(model_path, num_threads=num_threads)
        for name, expected in (("input gate", gate), ("screening head", head)):
            if expected is not None and self._model.feature_count != expected.feature_count:
                raise ModelArtifactError(
                    f"the {name} expects {expected.feature_count} features, the model gives {self._model.feature_count}"
                )
        try:
            self.screening: ScreeningStage = build_stage(spec.input_size, gate, head, spec.screening_figures)
        except ConditionHeadError as error:
            raise ModelArtifactError(str(error)) from error
        self._explainer: Explainer | None = None

    @classmethod
    def from_directory(cls, directory: Path, num_threads: int = 1) -> Classifier:
        """Load an artifact directory after checking its model file (explainer, input gate, screening head) against
        the card."""
        spec = verify_artifact(directory)
        gate = InputGate.load(directory / GATE_FILE) if spec.gate_sha256 is not None else None
        try:
            head = ConditionHead.load(directory / SCREENING_FILE) if spec.screening_sha256 is not None else None
        except ConditionHeadError as error:
            raise ModelArtifactError(str(error)) from error
        return cls(directory / MODEL_FILE, spec, num_threads=num_threads, directory=directory, gate=gate, head=head)

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def explainer(self) -> Explainer | None:
        """The card's class-activation explainer, or None when the card names none.

        It is loaded on first use, so a cold start that explains nothing never pays for it; its file is checked
        against the card's sha256 again at that moment, because the folder may have changed since the model loaded.
        """
        if self._explainer is None and self.spec.explainer_sha256 is not None and self.directory is not None:
            path = self.directory / EXPLAINER_FILE
            verify_file(path, self.spec.explainer_sha256)
            self._explainer = Explainer(path, num_threads=self._num_threads)
        return self._explainer

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Raw PNEUMONIA logits of a ``(n, size, size, 1)`` uint8 batch."""
        return self._model.logits(pixels, expected_size=self.input_size)

    def predict(self, pixels: np.ndarray) -> list[Prediction]:
        """Calibrated predictions for a batch of preprocessed images, whatever they show: for measuring the model.
        Serving uses ``screen``, which refuses what the screening stage does not accept."""
        if len(pixels) == 0:
            return []
        return [self.calibrate(float(logit)) for logit in self.logits(pixels)]

    def screen(
        self, pixels: np.ndarray, source_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[Prediction | InvalidImageError]:
        """For each image of a batch, its prediction, or the rejection of the first check of the screening stage
        that refuses it. ``source_sizes`` are the decoded files' widths and heights; without them the pixels are
        taken as the files themselves."""
        if len(pixels) == 0:
            return []
        sizes = tuple(source_sizes) if source_sizes is not None else ((self.input_size, self.input_size),) * len(pixels)
        if len(sizes) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(sizes)} source sizes")
        logits, features = self._model.run(pixels, expected_size=self.input_size)
        refusals = self.screening.screen(Films(pixels, features, sizes))
        return [
            self.calibrate(float(logit)) if refusal is None else InvalidImageError(refusal.reason, refusal.detail)
            for logit, refusal in zip(logits, refusals, strict=True)
        ]

    def calibrate(self, logit: float) -> Prediction:
        """Turn one logit into a prediction with the card's temperature, intercept and operating points."""
        # The label is called on the probability as the result states it (six places), so a reader who compares
        # the stated probability with the stated operating points always finds the stated label.
        probability = round(_stable_sigmoid(logit / self.spec.temperature + self.spec.intercept), 6)
        call = self.spec.points.call(probability)
        return Prediction(
            label=call.label,
            confidence=call.confidence,
            pneumonia_probability=probability,
            operating_points=self.spec.points,
            model_version=self.spec.version,
        )


def _stable_sigmoid(value: float) -> float:
    """The logistic function without overflow for large negative or positive inputs."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exponential = math.exp(value)
    return exponential / (1.0 + exponential)
