"""The screening stage on synthetic variants of validation films, through the scorer `pneumoscan score` runs.

Each validation film (patient-level split of train, the training recipe's share and seed) is varied as
``training.screening.validation_plan`` says: itself; the benign variants a readable film goes through (a 10-15%
zoom-in, a padding or collimation border, a tilt of up to 10 degrees, burned-in annotations, JPEG at quality 60,
upscaling, another window); the conditions the stage must refuse (a quarter or half of the film, the lungs under a
grey box, heavy blur, inverted grey levels, turned 90/180/270 degrees) and a 64 px thumbnail. Every variant is
encoded as a file and scored by ``scoring.scorer.score_files``, decoding and all, with a seed of its own. The test
split is never read. Run with `make bench`, or `python bench/bench_screening.py --model DIR [--films N]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.model_card import read_card
from core.preprocessing import preprocess
from core.rejections import InvalidImageError
from core.screening import Films
from scoring.classifier import Classifier, Prediction
from scoring.litert import ClassifierModel
from scoring.scorer import score_files
from training.data import list_split, patient_level_split
from training.screening import VALIDATION_BENIGN, validation_plan

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
RESULTS = ROOT / "bench" / "results.json"
SEED = 2026
"""The bench's own variants: not the ones training measured on."""
LAMBDA_BATCH = 10

REFUSED_AT_LEAST = {"partial": 0.90, "occluded": 0.90, "blurred": 0.90, "thumbnail": 0.90}
"""Bars: the share of each condition's variants refused."""
HANDLED_AT_LEAST = {"inverted": 0.95, "rotated_90": 0.95, "rotated_180": 0.95, "rotated_270": 0.95}
"""Bars: the share refused or read with the clean film's label."""
BENIGN_REFUSED_AT_MOST = 0.05
CLEAN_KEPT_AT_LEAST = 0.99


def encoded(image: Image.Image) -> bytes:
    """A variant as an uploaded file: PNG, so nothing but the variant itself changes the film."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def screen_variants(classifier: Classifier, films: list[Path]) -> dict[str, Any]:
    """Score every variant of every film in Lambda-sized batches; tally refusals and labels per kind."""
    refused: Counter[str] = Counter()
    handled: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for index, path in enumerate(films):
        rng = np.random.default_rng([SEED, index])
        with Image.open(path) as opened:
            film = opened.convert("L")
        samples = validation_plan(film, rng)
        payloads = [encoded(image) for _, _, image in samples]
        results = [
            r
            for s in range(0, len(payloads), LAMBDA_BATCH)
            for r in score_files(classifier, payloads[s : s + LAMBDA_BATCH])
        ]
        clean_label = results[0].label if isinstance(results[0], Prediction) else None
        for (kind, _, _), result in zip(samples, results, strict=True):
            totals[kind] += 1
            if isinstance(result, InvalidImageError):
                refused[kind] += 1
                handled[kind] += 1
                reasons[kind][result.reason.value] += 1
            elif clean_label is not None and result.label == clean_label:
                handled[kind] += 1
    return {
        kind: {
            "films": totals[kind],
            "refused": round(refused[kind] / totals[kind], 4),
            "refused_or_clean_label": round(handled[kind] / totals[kind], 4),
            "reasons": dict(reasons[kind]),
        }
        for kind in totals
    }


def stage_cost(classifier: Classifier, films: list[Path]) -> dict[str, float]:
    """Milliseconds per image of the model and of the screening stage, batches of ten, one thread."""
    pixels = np.stack([preprocess(path.read_bytes(), size=classifier.input_size).pixels for path in films])
    model = ClassifierModel(Path(classifier.directory or RELEASE_MODEL) / "model.tflite")
    batches = [pixels[s : s + LAMBDA_BATCH] for s in range(0, len(pixels), LAMBDA_BATCH)]
    started = time.perf_counter()
    outputs = [model.run(batch) for batch in batches]
    model_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for batch, (_, features) in zip(batches, outputs, strict=True):
        sizes = ((classifier.input_size, classifier.input_size),) * len(batch)
        classifier.screening.screen(Films(batch, features, sizes))
    stage_seconds = time.perf_counter() - started
    return {
        "model_ms_per_image": round(1000 * model_seconds / len(pixels), 3),
        "stage_ms_per_image": round(1000 * stage_seconds / len(pixels), 3),
    }


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=RELEASE_MODEL)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data" / "chest_xray")),
    )
    parser.add_argument("--films", type=int, help="a seeded sample of this many validation films (default: all)")
    arguments = parser.parse_args()
    card = read_card(arguments.model)
    hyperparameters = card["hyperparameters"]
    _, validation = patient_level_split(
        list_split(arguments.data / "train"), hyperparameters["validation_fraction"], hyperparameters["seed"]
    )
    films = [item.path for item in validation]
    if arguments.films is not None and arguments.films < len(films):
        picked = np.random.default_rng(SEED).choice(len(films), arguments.films, replace=False)
        films = [films[i] for i in sorted(picked)]
    classifier = Classifier.from_directory(arguments.model)
    print(f"model {card['version']}: stage {' -> '.join(classifier.screening.names)}")
    kinds = [kind for kind, _, _ in validation_plan(Image.new("L", (224, 224), 128), np.random.default_rng(0))]
    print(f"{len(films)} validation films, each as {len(kinds)} files: {', '.join(kinds)}\n")
    started = time.perf_counter()
    figures = screen_variants(classifier, films)
    print("| variant | bar | refused | refused or read with the clean film's label | reasons |\n|---|---|---|---|---|")
    for kind, row in figures.items():
        bar = _bar(kind)
        print(f"| {kind} | {bar} | {row['refused']:.1%} | {row['refused_or_clean_label']:.1%} | {row['reasons']} |")
    cost = stage_cost(classifier, films[:200])
    print(
        f"\nscreened {sum(r['films'] for r in figures.values())} files in {time.perf_counter() - started:.0f} s; "
        f"model {cost['model_ms_per_image']} ms per image, screening stage {cost['stage_ms_per_image']} ms per image"
    )
    met = all(_met(kind, row) for kind, row in figures.items())
    print(f"every bar met on validation variants: {met}")
    results = {"model_version": card["version"], "films": len(films), "variants": figures, **cost, "bars_met": met}
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "screening": results}, indent=2) + "\n")
    return results


def _bar(kind: str) -> str:
    if kind == "clean":
        return f"kept >= {CLEAN_KEPT_AT_LEAST:.0%}"
    if kind in REFUSED_AT_LEAST:
        return f"refused >= {REFUSED_AT_LEAST[kind]:.0%}"
    if kind in HANDLED_AT_LEAST:
        return f"refused or same label >= {HANDLED_AT_LEAST[kind]:.0%}"
    if kind in VALIDATION_BENIGN:
        return f"refused <= {BENIGN_REFUSED_AT_MOST:.0%}"
    return ""


def _met(kind: str, row: dict[str, Any]) -> bool:
    if kind == "clean":
        return bool(1.0 - row["refused"] >= CLEAN_KEPT_AT_LEAST)
    if kind in REFUSED_AT_LEAST:
        return bool(row["refused"] >= REFUSED_AT_LEAST[kind])
    if kind in HANDLED_AT_LEAST:
        return bool(row["refused_or_clean_label"] >= HANDLED_AT_LEAST[kind])
    return bool(row["refused"] <= BENIGN_REFUSED_AT_MOST)


if __name__ == "__main__":
    main()
