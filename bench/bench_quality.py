"""Quality of the served artifact on the test split, recomputed from scratch through `pneumoscan score`.

Every test image goes through the command users run; labels come from the folder names; the metrics (with
bootstrap 95% intervals) are printed next to what the model card claims. The input gate's figures follow: the test
films it keeps and the share of a set of non-radiographs it refuses. Run with `make bench`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.model_card import ServingSpec, read_card
from core.preprocessing import preprocess
from core.rejections import InvalidImageError, RejectionReason
from infra.non_radiographs import non_radiographs
from scoring.classifier import Classifier
from scoring.scorer import score_files
from training.data import list_split, patient_level_split
from training.metrics import HEADLINE_METRICS, METRIC_NAMES, evaluate

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
COMPARED_MODELS = {
    "teacher": ROOT / "models" / "release-teacher",
    "student": ROOT / "models" / "release-student",
    "previous release": ROOT / "models" / "previous-release",
}
"""Artifacts shown beside the served one: the model of the pair not served, and the release it replaced."""
RESULTS = ROOT / "bench" / "results.json"
REFUSALS_ALLOWED = 0.01
"""The screening stage's bar: at least 99% of the test films are kept (the input gate alone keeps every one)."""


def score_with_cli(model: Path, paths: list[Path]) -> list[dict[str, Any]]:
    """Run `pneumoscan score` over the files and parse its JSON lines."""
    command = [str(Path(sys.executable).parent / "pneumoscan"), "score", "--model", str(model), *map(str, paths)]
    output = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    return [json.loads(line) for line in output.splitlines()]


def measure_artifact(model: Path, paths: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The artifact's card and its test metrics recomputed through `pneumoscan score`."""
    lines = score_with_cli(model, paths)
    errors = [line for line in lines if "error" in line]
    if len(errors) > REFUSALS_ALLOWED * len(paths) or len(lines) != len(paths):
        # More test films refused by the screening stage than its bar allows: nothing is left out quietly.
        raise SystemExit(f"{len(errors)} test images could not be scored by {model}: {errors[:3]}")
    if errors:
        reasons = Counter(str(line.get("reason")) for line in errors)
        print(
            f"{model.name}: {len(errors)} of {len(paths)} test films refused ({dict(reasons)}); metrics over the rest"
        )
        lines = [line for line in lines if "error" not in line]
    labels = np.array([Path(line["path"]).parent.name == "PNEUMONIA" for line in lines], dtype=int)
    probabilities = np.array([line["pneumonia_probability"] for line in lines])
    card = read_card(model)
    return card, evaluate(labels, probabilities, ServingSpec.from_card(card).points, resamples=2000).to_dict()


def full_resolution_consistency(model: Path, data: Path, every: int = 7, limit: int = 100) -> dict[str, Any]:
    """How far a film's probability moves when it arrives as a ~2,000 px JPEG instead of the data set's copy.

    Measured on validation films (every ``every``-th of the patient-level validation split), never on the test
    split: the copy and its bicubic enlargement, re-encoded at quality 90 as real uploads are, both go through
    the served preprocessing and model."""
    classifier = Classifier.from_directory(model)
    _, validation = patient_level_split(list_split(data / "train"), 0.15, seed=42)
    chosen = validation[::every][:limit]
    copies, uploads = [], []
    for item in chosen:
        data_bytes = item.path.read_bytes()
        film = Image.open(io.BytesIO(data_bytes)).convert("L").resize((2048, 1856), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        film.save(buffer, format="JPEG", quality=90)
        copies.append(preprocess(data_bytes, size=classifier.input_size).pixels)
        uploads.append(preprocess(buffer.getvalue(), size=classifier.input_size).pixels)
    copy_probabilities = np.array([p.pneumonia_probability for p in classifier.predict(np.stack(copies))])
    upload_probabilities = np.array([p.pneumonia_probability for p in classifier.predict(np.stack(uploads))])
    refused = sum(isinstance(result, InvalidImageError) for result in classifier.screen(np.stack(uploads)))
    points = classifier.spec.points
    moved = np.abs(copy_probabilities - upload_probabilities)
    pairs = zip(copy_probabilities, upload_probabilities, strict=True)
    flips = np.array([points.call(copy).label != points.call(upload).label for copy, upload in pairs])
    return {
        "films": len(chosen),
        "max_probability_change": round(float(moved.max()), 4),
        "mean_probability_change": round(float(moved.mean()), 4),
        "labels_changed": int(flips.sum()),
        "uploads_refused_by_gate": refused,
    }


def gate_figures(model: Path, test_paths: list[Path]) -> dict[str, Any]:
    """The input gate's bars: test films kept (all of them, through the served path) and non-radiographs refused."""
    classifier = Classifier.from_directory(model)
    test_results = score_files(classifier, [path.read_bytes() for path in test_paths])
    items = non_radiographs()
    refused_by_category: dict[str, list[int]] = {}
    for item, result in zip(items, score_files(classifier, [item.data for item in items]), strict=True):
        refused = isinstance(result, InvalidImageError) and result.reason is RejectionReason.NOT_A_CHEST_XRAY
        refused_by_category.setdefault(item.category, []).append(int(refused))
    refused_total = sum(sum(values) for values in refused_by_category.values())
    return {
        "test_films": len(test_paths),
        "test_films_kept": sum(not isinstance(result, InvalidImageError) for result in test_results),
        "non_radiographs": len(items),
        "non_radiographs_refused": refused_total,
        "refused_share": round(refused_total / len(items), 4),
        "by_category": {name: f"{sum(values)}/{len(values)}" for name, values in sorted(refused_by_category.items())},
    }


def main() -> dict[str, Any]:
    data = Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data" / "chest_xray"))
    paths = sorted((data / "test").glob("*/*"))
    card, measured = measure_artifact(RELEASE_MODEL, paths)
    points = ServingSpec.from_card(card).points
    claimed = card["metrics"]["test"]
    print(
        f"model {card['version']} on {len(paths)} test images, NORMAL below {points.normal_below:.4f}, PNEUMONIA "
        f"from {points.pneumonia_from:.4f} (chosen on validation); screening view: INDETERMINATE counts as flagged; "
        f"INDETERMINATE share {measured['indeterminate_share']:.4f}\n"
    )
    print("| metric | recomputed (95% CI) | model card |")
    print("|---|---|---|")
    for name in METRIC_NAMES:
        value = measured[name]
        print(
            f"| {name} | {value['value']:.4f} ({value['low']:.4f}-{value['high']:.4f}) | {claimed[name]['value']:.4f} |"
        )
    print(f"\nconfusion matrix: {measured['confusion_matrix']}")
    figures = {"model_version": card["version"], "test_images": len(paths), "recomputed": measured, "card": claimed}

    rows = {f"served: {card.get('role', 'release')} ({card['architecture']})": (card, measured)}
    for name, folder in COMPARED_MODELS.items():
        if (folder / "model_card.json").is_file():
            other_card, other_measured = measure_artifact(folder, paths)
            rows[f"{name} ({other_card['architecture']})"] = (other_card, other_measured)
    print("\nSide by side on the test split, each at its own validation-chosen threshold, via `pneumoscan score`:\n")
    print("| model | size MB | " + " | ".join(HEADLINE_METRICS) + " |")
    print("|---|---|" + "---|" * len(HEADLINE_METRICS))
    comparison: dict[str, Any] = {}
    for name, (row_card, row_measured) in rows.items():
        values = " | ".join(f"{row_measured[metric]['value']:.3f}" for metric in HEADLINE_METRICS)
        print(f"| {name} {row_card['version']} | {row_card['model_size_bytes'] / 1e6:.1f} | {values} |")
        comparison[name] = {
            "version": row_card["version"],
            "model_size_bytes": row_card["model_size_bytes"],
            **{metric: row_measured[metric]["value"] for metric in HEADLINE_METRICS},
            "validation": {metric: row_card["metrics"]["validation"][metric]["value"] for metric in HEADLINE_METRICS},
        }
    figures["comparison"] = comparison
    print("\nFull-resolution consistency on validation films (copy vs the same film as a ~2,000 px JPEG):\n")
    print("| model | films | max change | mean change | labels changed | refused by gate |\n|---|---|---|---|---|---|")
    folders = {"served": RELEASE_MODEL, **{n: f for n, f in COMPARED_MODELS.items() if f.is_dir()}}
    consistency = {name: full_resolution_consistency(folder, data) for name, folder in folders.items()}
    for name, row in consistency.items():
        print(
            f"| {name} | {row['films']} | {row['max_probability_change']} | {row['mean_probability_change']} "
            f"| {row['labels_changed']} | {row['uploads_refused_by_gate']} |"
        )
    figures["full_resolution_consistency"] = consistency
    if read_card(RELEASE_MODEL).get("input_gate") is not None:
        gate = gate_figures(RELEASE_MODEL, paths)
        print("\nInput gate (NOT_A_CHEST_XRAY) of the served model (bars: every test film kept, >= 95% refused):\n")
        print(f"test X-rays kept: {gate['test_films_kept']} of {gate['test_films']}")
        print(
            f"non-radiographs refused: {gate['non_radiographs_refused']} of {gate['non_radiographs']} "
            f"({gate['refused_share']:.1%}); by category: "
            + ", ".join(f"{name} {share}" for name, share in gate["by_category"].items())
        )
        figures["input_gate"] = gate
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "quality": figures}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
