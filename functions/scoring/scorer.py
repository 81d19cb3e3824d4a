"""Score a batch of uploaded files: preprocess each, run one batched inference behind the model's screening stage,
keep per-file rejections (a DICOM stating a patient age outside the model card's validated population among them)."""

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
    source_sizes: list[tuple[int, int]] = []
    for position, payload in enumerate(payloads):
        try:
            model_input = preprocess(payload, size=classifier.input_size)
            check_stated_age(model_input.stated_age_years, classifier.spec.population.accepted)
        except InvalidImageError as error:
            results[position] = error
        else:
            batch_positions.append(position)
            batch_pixels.append(model_input.pixels)
            source_sizes.append((model_input.original_width, model_input.original_height))
    if batch_pixels:
        verdicts = classifier.screen(np.stack(batch_pixels), source_sizes)
        for position, prediction in zip(batch_positions, verdicts, strict=True):
            results[position] = prediction
    return [result for result in results if result is not None]
