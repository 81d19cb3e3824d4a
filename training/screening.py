"""Fitting the screening stage's film-condition head (``core.film_condition``) and measuring the whole stage.

The head is fitted on synthetic variants (``training.film_variants``) of the fit films, each read as serving reads
an upload: encoded as a file (JPEG of quality 70-95 or PNG), decoded and resized by the shared preprocessing, and
run through the exported model for its pooled features. Its threshold is set on the validation films, and the
whole stage (input gate, source resolution, the head's checks, in their serving order) is measured on variants of
the validation films. The test split is only reported on, and only by training (``test_kept``).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression

from core.film_condition import CLEAN, ConditionHead, condition_statistics
from core.input_gate import InputGate
from core.model_card import SCREENING_FILE
from core.preprocessing import preprocess
from core.rejections import InvalidImageError
from core.screening import HEAD_CHECKS, Films, ScreeningStage, build_stage, minimum_source_side
from scoring.litert import ClassifierModel
from training import film_variants
from training.data import LabelledFile

logger = logging.getLogger(__name__)

FIT_FILMS = 2500
"""At most this many fit films (a seeded sample) give the head its variants: ten variants each, every one a pass of
the served model, so fitting costs minutes rather than the tens of minutes of every fit film."""

BENIGN_PER_FIT_FILM = 2
"""Benign variants per fit film, beside the film itself, all of class ``clean``."""

BENIGN_BEFORE_CONDITION = 0.3
"""Share of a fit film's condition variants made from a benign variant of it, so that no benign trait (a border,
an annotation, JPEG blocks) comes to mean "clean"."""

REGULARISATION = 0.1
"""Inverse L2 strength of the logistic regression (scikit-learn's ``C``) on standardised inputs."""

MINIMUM_CLEAN_KEPT = 0.995
"""The head's threshold keeps at least this share of the clean validation films."""

THRESHOLD_CEILING = 0.5
"""The probability of ``clean`` below which a film is refused is at most this: a film is refused when its
conditions together are likelier than clean, unless that would refuse more clean validation films than
``MINIMUM_CLEAN_KEPT`` allows, in which case the threshold falls as far as needed, down to ``THRESHOLD_FLOOR``."""

THRESHOLD_FLOOR = 0.01
"""The threshold never falls below this: a film the head gives less than a 1% chance of being clean is refused,
whatever the validation films are. Without a floor, one odd clean film in a small validation split (a tightly
collimated film that looks cut off) would drag the threshold towards zero and switch the head off unnoticed."""

JPEG_SHARE = 0.6
"""Share of variants encoded as JPEG (quality 70-95); the rest as PNG."""

BATCH = 64

BAR_JPEG_QUALITY = 60

CATEGORY_CHECKS: dict[str, tuple[str, ...]] = {
    "thumbnail": ("source_resolution",),
    "partial": ("partial",),
    "occluded": ("occluded",),
    "blurred": ("blurred",),
    "inverted": ("inverted",),
    "rotated_90": ("rotated",),
    "rotated_180": ("rotated",),
    "rotated_270": ("rotated",),
}
"""Each validation condition and the checks meant to refuse it."""


class ScreeningFitError(RuntimeError):
    """The head cannot be fitted from the data given."""


Sample = tuple[str, int, Image.Image]
"""A variant: its kind (``clean``, a benign variant's or a condition's name), its head class index (-1 for none)
and the image."""

Plan = Callable[[Image.Image, np.random.Generator], list[Sample]]


def fit_plan(image: Image.Image, rng: np.random.Generator) -> list[Sample]:
    """A fit film's variants: itself, ``BENIGN_PER_FIT_FILM`` benign variants, and one of each condition."""
    samples: list[Sample] = [(CLEAN, 0, image)]
    samples.extend(("benign", 0, film_variants.benign_variant(image, rng)) for _ in range(BENIGN_PER_FIT_FILM))
    for index, (name, variant) in enumerate(film_variants.CONDITION_VARIANTS.items(), start=1):
        base = film_variants.benign_variant(image, rng) if rng.random() < BENIGN_BEFORE_CONDITION else image
        samples.append((name, index, variant(base, rng)))
    return samples


def _jpeg_at_bar_quality(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    with Image.open(io.BytesIO(film_variants.jpeg_bytes(image, BAR_JPEG_QUALITY))) as reencoded:
        return reencoded.convert("L")


VALIDATION_BENIGN: dict[str, film_variants.Variant] = {
    **film_variants.BENIGN_VARIANTS,
    "zoom_in": functools.partial(film_variants.zoom_in, least=0.10, most=0.15),
    "jpeg": _jpeg_at_bar_quality,
}
"""The benign variants as the bars state them: a 10-15% zoom-in and JPEG at quality 60."""


def validation_plan(image: Image.Image, rng: np.random.Generator) -> list[Sample]:
    """A validation film's variants: itself, each benign variant, each condition and a 64 px thumbnail."""
    samples: list[Sample] = [(CLEAN, 0, image)]
    samples.extend((name, 0, variant(image, rng)) for name, variant in VALIDATION_BENIGN.items())
    samples.extend(
        (name, index, variant(image, rng))
        for index, (name, variant) in enumerate(film_variants.CONDITION_VARIANTS.items(), start=1)
    )
    samples.append(("thumbnail", -1, film_variants.thumbnail(image, rng)))
    return samples


@dataclass(frozen=True)
class VariantSet:
    """Variants of films as the served model reads them."""

    pixels: np.ndarray
    """``(n, size, size, 1)`` uint8 model inputs."""
    features: np.ndarray
    """``(n, features)`` pooled features of the served model."""
    source_sizes: tuple[tuple[int, int], ...]
    labels: np.ndarray
    """``(n,)`` head class index, -1 for a variant of no head class (a thumbnail)."""
    kinds: tuple[str, ...]
    films: int
    undecodable: Counter[str]
    """Variants the preprocessing refused, by kind (counted as refused when measuring)."""

    def films_of(self, kind: str) -> Films:
        """The variants of one kind, as the stage sees a batch."""
        positions = [index for index, name in enumerate(self.kinds) if name == kind]
        return Films(self.pixels[positions], self.features[positions], tuple(self.source_sizes[i] for i in positions))


@dataclass(frozen=True)
class _Read:
    """One variant as the preprocessing left it: its model input, or None when it refused the file."""

    kind: str
    label: int
    pixels: np.ndarray | None
    source_size: tuple[int, int]


def build_variants(
    files: Sequence[LabelledFile], plan: Plan, model_path: Path, seed: int, workers: int = 2
) -> VariantSet:
    """Every variant the plan makes of each file, encoded, preprocessed and run through the model."""
    model = ClassifierModel(model_path, num_threads=min(4, os.cpu_count() or 1))
    size = model.input_size

    def read(item: tuple[int, LabelledFile]) -> list[_Read]:
        index, labelled = item
        rng = np.random.default_rng([seed, index])
        with Image.open(labelled.path) as opened:
            film = opened.convert("L")
        variants = []
        for kind, label, image in plan(film, rng):
            try:
                model_input = preprocess(_encoded(image, rng), size=size)
            except InvalidImageError:
                variants.append(_Read(kind, label, None, image.size))
            else:
                source = (model_input.original_width, model_input.original_height)
                variants.append(_Read(kind, label, model_input.pixels, source))
        return variants

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = [row for film in pool.map(read, enumerate(files)) for row in film]
    kept = [(row, row.pixels) for row in rows if row.pixels is not None]
    if not kept:
        raise ScreeningFitError("no variant of the films could be decoded")
    pixels = np.stack([row_pixels for _, row_pixels in kept])
    _, features = model.run_in_batches(pixels, batch_size=BATCH)
    if features is None:
        raise ScreeningFitError(f"{model_path} has no pooled features output")
    return VariantSet(
        pixels=pixels,
        features=features.astype(np.float32),
        source_sizes=tuple(row.source_size for row, _ in kept),
        labels=np.array([row.label for row, _ in kept], dtype=np.int64),
        kinds=tuple(row.kind for row, _ in kept),
        films=len(files),
        undecodable=Counter(row.kind for row in rows if row.pixels is None),
    )


def _encoded(image: Image.Image, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    if rng.random() < JPEG_SHARE:
        image.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def fit_condition_head(fit: VariantSet, clean_validation: Films) -> ConditionHead:
    """Fit the logistic regression on the fit variants and set its threshold on the clean validation films."""
    labels = fit.labels
    if set(np.unique(labels)) != set(range(len(film_variants.CLASSES))):
        raise ScreeningFitError("the fit variants do not hold every class of the head")
    if clean_validation.features is None or len(clean_validation) == 0:
        raise ScreeningFitError("the head's threshold needs validation films")
    inputs = np.concatenate([fit.features.astype(np.float64), condition_statistics(fit.pixels)], axis=1)
    mean = inputs.mean(axis=0)
    scale = inputs.std(axis=0)
    scale[scale < 1e-6] = 1.0  # A constant input (a dead feature) contributes nothing either way.
    regression = LogisticRegression(C=REGULARISATION, max_iter=3000)
    regression.fit((inputs - mean) / scale, labels)
    provisional = ConditionHead(
        classes=film_variants.CLASSES,
        input_mean=mean,
        input_scale=scale,
        weights=regression.coef_.T.astype(np.float64),
        bias=regression.intercept_.astype(np.float64),
        clean_threshold=THRESHOLD_CEILING,
    )
    clean = provisional.probabilities(clean_validation.pixels, clean_validation.features)[:, 0]
    threshold = clean_threshold(clean)
    head = ConditionHead(
        classes=provisional.classes,
        input_mean=mean,
        input_scale=scale,
        weights=provisional.weights,
        bias=provisional.bias,
        clean_threshold=threshold,
    )
    head.validate()
    return head


def clean_threshold(clean_probabilities: np.ndarray) -> float:
    """``THRESHOLD_CEILING``, or lower when that would refuse more clean validation films than
    ``MINIMUM_CLEAN_KEPT`` allows: then halfway between the last film it may refuse and the first it must keep (so
    that neither sits on the threshold itself), but never below ``THRESHOLD_FLOOR``."""
    ranked = np.sort(np.asarray(clean_probabilities, dtype=np.float64))
    allowed = math.floor((1.0 - MINIMUM_CLEAN_KEPT) * len(ranked) + 1e-9)
    below_first_kept = (ranked[allowed - 1] + ranked[allowed]) / 2 if allowed > 0 else ranked[0] / 2
    return float(min(THRESHOLD_CEILING, max(below_first_kept, THRESHOLD_FLOOR)))


@dataclass(frozen=True)
class StageFigures:
    """What the whole stage did to each kind of validation variant."""

    refused: dict[str, float]
    """Share of each kind's variants the stage refused (undecodable variants count as refused)."""
    images: dict[str, int]
    refused_by_check: dict[str, dict[str, int]]
    """For each kind, how many of its variants each check refused first."""
    milliseconds_per_image: float
    """The stage's own cost (image statistics, gate, head), beside the model's inference."""


def measure_stage(stage: ScreeningStage, validation: VariantSet) -> StageFigures:
    """Screen every kind of validation variant with the stage, as serving would."""
    refused: dict[str, float] = {}
    images: dict[str, int] = {}
    by_check: dict[str, dict[str, int]] = {}
    elapsed = 0.0
    screened = 0
    for kind in dict.fromkeys(validation.kinds):
        films = validation.films_of(kind)
        started = time.perf_counter()
        refusals = [r for start in range(0, len(films), BATCH) for r in stage.screen(_batch(films, start))]
        elapsed += time.perf_counter() - started
        screened += len(films)
        undecodable = validation.undecodable[kind]
        images[kind] = len(films) + undecodable
        refused[kind] = (sum(refusal is not None for refusal in refusals) + undecodable) / images[kind]
        counts = Counter(refusal.check for refusal in refusals if refusal is not None)
        by_check[kind] = dict(counts, **({"preprocessing": undecodable} if undecodable else {}))
    return StageFigures(refused, images, by_check, 1000 * elapsed / max(screened, 1))


def kept_share(stage: ScreeningStage, pixels: np.ndarray, features: np.ndarray) -> float:
    """The share of model inputs (taken as the files themselves) that the stage lets through."""
    films = Films(pixels, features, ((pixels.shape[2], pixels.shape[1]),) * len(pixels))
    refusals = [r for start in range(0, len(films), BATCH) for r in stage.screen(_batch(films, start))]
    return sum(refusal is None for refusal in refusals) / len(refusals)


def _batch(films: Films, start: int) -> Films:
    end = start + BATCH
    features = films.features[start:end] if films.features is not None else None
    return Films(films.pixels[start:end], features, films.source_sizes[start:end])


@dataclass(frozen=True)
class FittedScreening:
    """A fitted head with what fitting and measuring found."""

    head: ConditionHead
    fit_films: int
    fit_images: int
    validation_films: int
    figures: StageFigures
    input_size: int

    def check_figures(self) -> dict[str, dict[str, Any]]:
        """Each check's measured figures, by check name: the share of clean validation films it refused first and,
        for the checks meant for a condition, the share of that condition's variants the stage refused."""
        figures: dict[str, dict[str, Any]] = {}
        clean_count = self.figures.images[CLEAN]
        names = ["input_gate", "source_resolution", *(name for name, _, _, _ in HEAD_CHECKS)]
        for name in names:
            targets = [kind for kind, checks in CATEGORY_CHECKS.items() if name in checks]
            entry: dict[str, Any] = {
                "clean_validation_refused": self.figures.refused_by_check[CLEAN].get(name, 0) / clean_count
            }
            if targets:
                entry["validation_variants"] = targets
                entry["validation_variants_refused"] = min(self.figures.refused[kind] for kind in targets)
                entry["validation_variants_refused_by_this_check"] = min(
                    self.figures.refused_by_check[kind].get(name, 0) / self.figures.images[kind] for kind in targets
                )
            if name == "source_resolution":
                entry["minimum_side"] = minimum_source_side(self.input_size)
            figures[name] = entry
        return figures

    def card_section(self, sha256: str, stage: ScreeningStage, test_kept: float | None = None) -> dict[str, Any]:
        """The model card's ``screening`` section."""
        check_figures = self.check_figures()
        benign = [name for name in VALIDATION_BENIGN]
        conditions = [*film_variants.CONDITION_VARIANTS, "thumbnail"]
        return {
            "file": SCREENING_FILE,
            "sha256": sha256,
            "order": list(stage.names),
            "method": (
                "multinomial logistic regression on the model's pooled features and coarse image statistics "
                f"(classes {', '.join(self.head.classes)}), fitted on synthetic variants of {self.fit_films} fit films "
                f"({self.fit_images} images); a film is refused when P(clean) < the threshold, as the likeliest "
                "other class"
            ),
            "clean_threshold": self.head.clean_threshold,
            "threshold_rule": (
                f"{THRESHOLD_CEILING}, or lower as needed to keep >= {MINIMUM_CLEAN_KEPT:.1%} of the clean "
                f"validation films, never below {THRESHOLD_FLOOR}"
            ),
            "source_rule": "shorter side of the decoded file below 3/4 of the model's input side",
            "checks": [
                {"name": check.name, "reason": check.reason.value, "figures": check_figures.get(check.name, {})}
                for check in stage.checks
            ],
            "validation": {
                "films": self.validation_films,
                "clean_kept": 1.0 - self.figures.refused[CLEAN],
                "benign_refused": {name: self.figures.refused[name] for name in benign},
                "conditions_refused": {name: self.figures.refused[name] for name in conditions},
                "refused_by_check": self.figures.refused_by_check,
            },
            "milliseconds_per_image": round(self.figures.milliseconds_per_image, 3),
            **({"test_kept": test_kept} if test_kept is not None else {}),
        }


def fit_screening(
    model_path: Path,
    fit_files: Sequence[LabelledFile],
    validation_files: Sequence[LabelledFile],
    gate: InputGate | None,
    seed: int,
    *,
    fit_films: int = FIT_FILMS,
    validation_films: int | None = None,
) -> FittedScreening:
    """Fit the head for the model at ``model_path`` and measure the whole stage it completes on validation.

    ``validation_films`` limits the validation films to a seeded sample (tests); training uses them all."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(fit_files), min(fit_films, len(fit_files)), replace=False))
    if validation_films is not None and validation_films < len(validation_files):
        picked = sorted(rng.choice(len(validation_files), validation_films, replace=False))
        validation_files = [validation_files[i] for i in picked]
    started = time.perf_counter()
    fit = build_variants([fit_files[i] for i in chosen], fit_plan, model_path, seed)
    validation = build_variants(validation_files, validation_plan, model_path, seed + 1)
    logger.info(
        "screening variants: %d fit, %d validation images in %.0f s",
        len(fit.kinds),
        len(validation.kinds),
        time.perf_counter() - started,
    )
    head = fit_condition_head(fit, validation.films_of(CLEAN))
    size = int(fit.pixels.shape[1])
    figures = measure_stage(build_stage(size, gate, head), validation)
    logger.info("screening: threshold %.4f, refused on validation %s", head.clean_threshold, figures.refused)
    return FittedScreening(head, len(chosen), len(fit.kinds), len(validation_files), figures, size)
