"""Score a batch of uploaded files: preprocess each, run one batched inference behind the model's input gate, keep
per-file rejections (a DICOM stating a patient age outside the model card's validated population among them)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.population import check_stated_age
from core.preprocessing import preprocess
from core.rejections import InvalidImageError
from scoring.classifier import Classifier, Prediction


def score_files(classifier: Classifier, payloads: Sequence[bytes]) -> list[Prediction | InvalidImageError]:
    """One result per payload, in order: a prediction, or the reason the file can never be scored."""
    results: list[Prediction | InvalidImageError | None] = [None] * len(payloads)
    batch_positions: list[int] = []
    batch_pixels: list[np.ndarray] = []
    for position, payload in enumerate(payloads):
        try:
            model_input = preprocess(payload, size=classifier.input_size)
            check_stated_age(model_input.stated_age_years, classifier.spec.population.accepted)
            batch_pixels.append(model_input.pixels)
        except InvalidImageError as error:
            results[position] = error
        else:
            batch_positions.append(position)
    if batch_pixels:
        for position, prediction in zip(batch_positions, classifier.screen(np.stack(batch_pixels)), strict=True):
            results[position] = prediction
    return [result for result in results if result is not None]
