"""The validation stress suite: files made from validation films the way real uploads differ from the copies.

Each variant is a new file (PNG, or JPEG for the re-encoding), built from the decoded film and read back through
the shared preprocessing, exactly as an upload would be. The variants are the framing and encoding changes a
screener must shrug off (a tighter or looser field of view, a tilt, a burned-in annotation, another encoder, a
larger scan, another window, a little blur or noise). Only validation films are ever transformed here: the suite
chooses training recipes, so the test split never goes through it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from core.labels import Label
from core.preprocessing import decode, preprocess
from scoring.classifier import Classifier, Prediction
from training.data import LabelledFile

Transform = Callable[[Image.Image, np.random.Generator], tuple[Image.Image, str]]
"""A film (8-bit grayscale) and a random generator to the transformed film and the format to save it in."""


def _crop(share: float) -> Transform:
    def crop(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
        width, height = film.size
        crop_width, crop_height = round(width * (1 - share)), round(height * (1 - share))
        left = int(random.integers(0, width - crop_width + 1))
        top = int(random.integers(0, height - crop_height + 1))
        return film.crop((left, top, left + crop_width, top + crop_height)), "PNG"

    return crop


def _pad(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    """A border of 8-12% on every side, black or white, as scanners and collimators leave."""
    width, height = film.size
    border = round(min(width, height) * random.uniform(0.08, 0.12))
    padded = Image.new("L", (width + 2 * border, height + 2 * border), 0 if random.random() < 0.7 else 255)
    padded.paste(film, (border, border))
    return padded, "PNG"


def _rotate(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    """A tilt of 7 to 10 degrees either way, the corners filled black."""
    angle = random.uniform(7.0, 10.0) * random.choice([-1.0, 1.0])
    return film.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0), "PNG"


def _annotate(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    """A burned-in annotation: a white box with dark text in a corner, and a side marker letter."""
    annotated = film.copy()
    draw = ImageDraw.Draw(annotated)
    width, height = film.size
    box_width, box_height = round(width * random.uniform(0.2, 0.3)), round(height * random.uniform(0.06, 0.1))
    corner = int(random.integers(0, 4))
    left = 4 if corner % 2 == 0 else width - box_width - 4
    top = 4 if corner < 2 else height - box_height - 4
    draw.rectangle((left, top, left + box_width, top + box_height), fill=255)
    draw.text((left + 3, top + 2), "PORTABLE AP 12:04", fill=0)
    draw.text((width - 20 if corner % 2 == 0 else 8, height // 3), "R", fill=255)
    return annotated, "PNG"


def _jpeg(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    del random
    return film, "JPEG60"


def _upscale(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    factor = random.uniform(1.8, 2.5)
    size = (round(film.width * factor), round(film.height * factor))
    return film.resize(size, Image.Resampling.BICUBIC), "PNG"


def _window(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    """Another display: gamma between 0.7 and 1.4 and a narrower or wider window."""
    pixels = np.asarray(film, dtype=np.float64) / 255.0
    gamma = float(np.exp(random.uniform(np.log(0.7), np.log(1.4))))
    low, high = random.uniform(-0.1, 0.1), random.uniform(0.9, 1.1)
    shown = np.clip((pixels - low) / (high - low), 0.0, 1.0) ** gamma
    return Image.fromarray(np.round(shown * 255).astype(np.uint8)), "PNG"


def _blur(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    """A mild blur: sigma of 0.5-1% of the film's side, what a slightly soft detector gives."""
    radius = min(film.size) * random.uniform(0.005, 0.01)
    return film.filter(ImageFilter.GaussianBlur(radius)), "PNG"


def _noise(film: Image.Image, random: np.random.Generator) -> tuple[Image.Image, str]:
    pixels = np.asarray(film, dtype=np.float64)
    noisy = pixels + random.normal(0.0, random.uniform(3.0, 6.0), pixels.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8)), "PNG"


STRESS_VARIANTS: dict[str, Transform] = {
    "crop_10": _crop(0.10),
    "crop_15": _crop(0.15),
    "pad": _pad,
    "rotate_10": _rotate,
    "annotate": _annotate,
    "jpeg_60": _jpeg,
    "upscale": _upscale,
    "window": _window,
    "blur_mild": _blur,
    "noise": _noise,
}
"""The suite's variants, in the order they are printed."""


def encode(film: Image.Image, file_format: str) -> bytes:
    """The film as file bytes: PNG, or JPEG at the quality the format names (``JPEG60``)."""
    buffer = io.BytesIO()
    if file_format.startswith("JPEG"):
        film.save(buffer, format="JPEG", quality=int(file_format[4:]))
    else:
        film.save(buffer, format=file_format)
    return buffer.getvalue()


def variant_bytes(data: bytes, variant: str, seed: int) -> bytes:
    """The file of one stress variant of a film's bytes; the same seed gives the same file."""
    film = decode(data).grayscale
    transformed, file_format = STRESS_VARIANTS[variant](film, np.random.default_rng(seed))
    return encode(transformed, file_format)


@dataclass(frozen=True)
class StressSet:
    """The model inputs of every variant of a set of films, aligned with the films."""

    variants: dict[str, np.ndarray]
    """Variant name to ``(n, size, size, 1)`` uint8."""
    labels: np.ndarray


def build_stress_set(
    files: Sequence[LabelledFile], size: int, variants: Sequence[str] = tuple(STRESS_VARIANTS), seed: int = 7
) -> StressSet:
    """Every variant of every film as model input; each film's variants get their own fixed seeds."""
    built: dict[str, list[np.ndarray]] = {variant: [] for variant in variants}
    for index, item in enumerate(files):
        data = item.path.read_bytes()
        for offset, variant in enumerate(variants):
            file_bytes = variant_bytes(data, variant, seed * 1_000_003 + index * 31 + offset)
            built[variant].append(preprocess(file_bytes, size).pixels)
    return StressSet(
        variants={variant: np.stack(images) for variant, images in built.items()},
        labels=np.array([item.label for item in files], dtype=np.int64),
    )


@dataclass(frozen=True)
class StressFigures:
    """How one variant's calls compare with the truth and with the clean films' calls, at P(pneumonia) = 0.5."""

    sensitivity: float
    specificity: float
    same_call: float

    @property
    def balanced_accuracy(self) -> float:
        return (self.sensitivity + self.specificity) / 2


def stress_figures(labels: np.ndarray, clean_logits: np.ndarray, variant_logits: np.ndarray) -> StressFigures:
    """Sensitivity, specificity and agreement with the clean film of a variant, calling PNEUMONIA at logit >= 0.

    The logit's sign is P(pneumonia) against 0.5 whatever the temperature, so the figures need no calibration."""
    called = variant_logits >= 0
    return StressFigures(
        sensitivity=float(called[labels == 1].mean()),
        specificity=float((~called)[labels == 0].mean()),
        same_call=float((called == (clean_logits >= 0)).mean()),
    )


@dataclass(frozen=True)
class ServedStressFigures:
    """One variant through the served path (input gate and operating points): how often it is refused, and the
    screening figures and agreement with the clean film's label of what is scored."""

    variant: str
    films: int
    refused: float
    same_label: float
    """Among films whose variant and clean film were both scored, the share with the same label."""
    sensitivity: float
    """Flagged (not NORMAL) share of the scored pneumonia films."""
    specificity: float
    """NORMAL share of the scored normal films."""

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "variant": self.variant,
            "films": self.films,
            "refused": round(self.refused, 4),
            "same_label": round(self.same_label, 4),
            "sensitivity": round(self.sensitivity, 4),
            "specificity": round(self.specificity, 4),
        }


def served_stress_figures(classifier: Classifier, images: np.ndarray, stress: StressSet) -> list[ServedStressFigures]:
    """The clean films (``images``) and every variant of the suite through ``Classifier.screen``."""
    clean = classifier.screen(images)
    rows = [_served_row("clean", clean, clean, stress.labels)]
    rows += [
        _served_row(variant, classifier.screen(variant_images), clean, stress.labels)
        for variant, variant_images in stress.variants.items()
    ]
    return rows


def _served_row(
    variant: str, verdicts: Sequence[object], clean: Sequence[object], labels: np.ndarray
) -> ServedStressFigures:
    scored = np.array([isinstance(verdict, Prediction) for verdict in verdicts])
    flagged = np.array([isinstance(v, Prediction) and v.label is not Label.NORMAL for v in verdicts])
    both = [
        (verdict, reference)
        for verdict, reference in zip(verdicts, clean, strict=True)
        if isinstance(verdict, Prediction) and isinstance(reference, Prediction)
    ]
    positives, negatives = scored & (labels == 1), scored & (labels == 0)
    return ServedStressFigures(
        variant=variant,
        films=len(verdicts),
        refused=float(1.0 - scored.mean()),
        same_label=float(np.mean([v.label == r.label for v, r in both])) if both else 0.0,
        sensitivity=float(flagged[positives].mean()) if positives.any() else 0.0,
        specificity=float((~flagged)[negatives].mean()) if negatives.any() else 0.0,
    )


def stress_table(rows: Sequence[ServedStressFigures]) -> str:
    """The served figures as a Markdown table."""
    lines = [
        "| variant | films | refused | same label as clean | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row.variant} | {row.films} | {row.refused:.3f} | {row.same_label:.3f} | {row.sensitivity:.3f} | "
        f"{row.specificity:.3f} |"
        for row in rows
    ]
    return "\n".join(lines)
