"""How DICOM display holds the served model's labels: 12-bit DICOM files made from real films, scored like the
films' JPEG copies.

Films: 50 NORMAL and 50 PNEUMONIA films of the patient-level validation split of train (never the test split),
each written as a 12-bit DICOM (``infra/dicom_films.py``: its gray levels mapped linearly onto part of the 0-4095
range, the encodings cycled: mid-range, narrow, with a rescale slope and intercept, MONOCHROME1), without and with
a window that shows the film's range, without and with one full-scale burned-in marker (a 4095 square, 8% of the
shorter side, in the top right corner). Each file goes through the served preprocessing and model; the figures are
the labels equal to the JPEG copy's, the change in pneumonia probability, and the mean gray-level difference from
the copy outside the marker. "min-max stretch" is the display before the robust window (the modality values
stretched from their minimum to their maximum), for comparison.

It first recomputes ``core.dicom.TRAINING_FILM_LEVELS``, the training films' gray levels at the robust window's
percentiles, over the fit part of train. Run with `make bench`; merges its figures into bench/results.json.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels.processing import apply_modality_lut

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "functions")]

from core.dicom import ROBUST_PERCENTILES, TRAINING_FILM_LEVELS  # noqa: E402  # After the path set-up above.
from core.preprocessing import DecodedImage, ImageFormat, decode, preprocess, resize_for_model  # noqa: E402
from infra.dicom_films import FILM_ENCODINGS, MARKER_SIDE, burn_marker, film_dicom  # noqa: E402
from scoring.classifier import Classifier  # noqa: E402
from training.data import LabelledFile, list_split, patient_level_split  # noqa: E402

RELEASE_MODEL = ROOT / "models" / "release"
RESULTS = ROOT / "bench" / "results.json"
FILMS_PER_CLASS = 50


def training_levels(fit: list[LabelledFile]) -> dict[str, list[float]]:
    """Each class's median gray levels at ``ROBUST_PERCENTILES`` over its fit films, extremes left out as the robust
    window leaves them out, and the mean of the two (what ``TRAINING_FILM_LEVELS`` holds)."""
    levels: dict[str, list[list[float]]] = {"NORMAL": [], "PNEUMONIA": []}
    for item in fit:
        values = np.asarray(Image.open(item.path).convert("L"), dtype=np.float64).ravel()
        inner = values[(values > values.min()) & (values < values.max())]
        levels[item.path.parent.name].append(list(np.percentile(inner if inner.size else values, ROBUST_PERCENTILES)))
    medians = {name: [float(v) for v in np.median(rows, axis=0)] for name, rows in levels.items()}
    medians["mean of the classes"] = [float(v) for v in np.mean(list(medians.values()), axis=0)]
    return medians


def chosen_films(validation: list[LabelledFile]) -> list[LabelledFile]:
    """``FILMS_PER_CLASS`` films of each class, spread evenly over the validation split."""
    chosen: list[LabelledFile] = []
    for label in (0, 1):
        files = [item for item in validation if item.label == label]
        step = max(1, len(files) // FILMS_PER_CLASS)
        chosen += files[::step][:FILMS_PER_CLASS]
    return chosen


def min_max_display(data: bytes) -> Image.Image:
    """The display before the robust window: modality values stretched from their minimum to their maximum."""
    dataset = dcmread(io.BytesIO(data))
    values = np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float64)
    scaled = (values - values.min()) * (255.0 / (values.max() - values.min()))
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        scaled = 255.0 - scaled
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def measure(
    classifier: Classifier, films: list[LabelledFile], *, window: bool, marker: bool, min_max: bool = False
) -> dict[str, Any]:
    """Labels, probabilities and gray levels of the films' DICOM files against their JPEG copies."""
    size = classifier.input_size
    references, pixels, differences = [], [], []
    for index, item in enumerate(films):
        jpeg = item.path.read_bytes()
        film = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
        data = film_dicom(film, FILM_ENCODINGS[index % len(FILM_ENCODINGS)], window=window, marker=marker)
        if min_max:
            gray = min_max_display(data)
            decoded = DecodedImage(gray, ImageFormat.DICOM, gray.width, gray.height)
        else:
            decoded = decode(data, size)
        shown = np.asarray(decoded.grayscale, dtype=np.float64)
        outside_marker = burn_marker(np.zeros(film.shape, dtype=np.uint16)) == 0
        differences.append(float(np.abs(shown - film)[outside_marker].mean()))
        references.append(preprocess(jpeg, size).pixels)
        pixels.append(resize_for_model(decoded, size).pixels)
    reference = np.array([p.pneumonia_probability for p in classifier.predict(np.stack(references))])
    shown_probability = np.array([p.pneumonia_probability for p in classifier.predict(np.stack(pixels))])
    threshold = classifier.spec.threshold
    same = int(((reference >= threshold) == (shown_probability >= threshold)).sum())
    moved = np.abs(reference - shown_probability)
    return {
        "films": len(films),
        "same_label": same,
        "same_label_share": round(same / len(films), 4),
        "mean_probability_change": round(float(moved.mean()), 4),
        "max_probability_change": round(float(moved.max()), 4),
        "mean_gray_level_difference": round(float(np.mean(differences)), 2),
    }


def main() -> dict[str, Any]:
    data = Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data" / "chest_xray"))
    fit, validation = patient_level_split(list_split(data / "train"), 0.15, seed=42)
    levels = training_levels(fit)
    print(f"Training films' gray levels at percentiles {ROBUST_PERCENTILES} (extremes left out), fit split medians:")
    for name, values in levels.items():
        print(f"  {name:20s} {values[0]:6.1f} {values[1]:6.1f}")
    print(f"  core.dicom.TRAINING_FILM_LEVELS {TRAINING_FILM_LEVELS}\n")
    classifier = Classifier.from_directory(RELEASE_MODEL)
    films = chosen_films(validation)
    encodings = ", ".join(encoding.name for encoding in FILM_ENCODINGS)
    print(
        f"{len(films)} validation films as 12-bit DICOM ({encodings}); marker: full-scale square, "
        f"{MARKER_SIDE:.0%} of the shorter side. Same label as the JPEG copy, model {classifier.spec.version}:\n"
    )
    header = ("display", "window", "marker", "same label", "mean dp", "max dp", "gray diff")
    print("{:22s} {:7s} {:7s} {:>11s} {:>8s} {:>7s} {:>9s}".format(*header))
    rows = []
    conditions = [("as the standard says", False, False), ("as the standard says", True, False)]
    conditions += [("as the standard says", False, True), ("as the standard says", True, True)]
    conditions += [("min-max stretch", False, False), ("min-max stretch", False, True)]
    for display, window, marker in conditions:
        figures = measure(classifier, films, window=window, marker=marker, min_max=display == "min-max stretch")
        rows.append({"display": display, "window": window, "marker": marker, **figures})
        print(
            f"{display:22s} {'yes' if window else 'no':7s} {'yes' if marker else 'no':7s} "
            f"{figures['same_label']:>5d}/{figures['films']:<5d} {figures['mean_probability_change']:8.4f} "
            f"{figures['max_probability_change']:7.4f} {figures['mean_gray_level_difference']:9.2f}"
        )
    return {"training_levels": levels, "conditions": rows}


if __name__ == "__main__":
    measured = main()
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "dicom_display": measured}, indent=2) + "\n")
