"""Score uploaded files: preprocess each, run batched inference behind the model's screening stage, keep per-file
rejections (a DICOM stating a patient age outside the model card's validated population among them).

Files are taken ``INFERENCE_BATCH`` at a time, so scoring any number of them holds only one slice's files, films
and model inputs in memory at once."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np

from core.population import check_stated_age
from core.preprocessing import preprocess
from core.rejections import InvalidImageError
from scoring.classifier import Classifier, Prediction
from scoring.litert import INFERENCE_BATCH


def score_files(classifier: Classifier, payloads: Iterable[bytes]) -> list[Prediction | InvalidImageError]:
    """One result per payload, in order: a prediction, or the reason the file can never be scored."""
    return list(score_stream(classifier, payloads))


def score_stream(classifier: Classifier, payloads: Iterable[bytes]) -> Iterator[Prediction | InvalidImageError]:
    """``score_files`` as results come: ``payloads`` is read ``INFERENCE_BATCH`` files ahead of what is yielded."""
    remaining = iter(payloads)
    while chunk := list(itertools.islice(remaining, INFERENCE_BATCH)):
        yield from _score_slice(classifier, chunk)


def _score_slice(classifier: Classifier, payloads: list[bytes]) -> list[Prediction | InvalidImageError]:
    """One result per payload of a slice, in order, from one screened inference."""
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
