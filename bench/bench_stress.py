"""The validation stress suite through the served model: framing and encoding variants of validation films.

Each validation film (the patient-level split of train the release was trained with) is rebuilt as a file in every
variant of ``training.stress`` (crops, padding, a tilt, a burned-in annotation, JPEG at quality 60, an upscale,
another window, mild blur, noise), read back through the shared preprocessing and screened by the release model as
served: the input gate may refuse it, and a scored film is labelled at the card's operating points. Printed per
variant: the share refused, the share with the clean film's label, and the screening sensitivity and specificity
(INDETERMINATE counts as flagged). The test split is never used here: this suite chooses recipes. Run with
`make bench`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scoring.classifier import Classifier
from training.data import list_split, load_images, patient_level_split
from training.stress import build_stress_set, served_stress_figures, stress_table

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
RESULTS = ROOT / "bench" / "results.json"


def main() -> None:
    data = Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data" / "chest_xray"))
    classifier = Classifier.from_directory(RELEASE_MODEL)
    _, validation = patient_level_split(list_split(data / "train"), 0.15, seed=42)
    started = time.perf_counter()
    clean = load_images(validation, size=classifier.input_size)
    stress = build_stress_set(validation, classifier.input_size)
    rows = served_stress_figures(classifier, clean.images, stress)
    print(
        f"\nValidation stress suite: {len(validation)} validation films of {classifier.spec.version} in "
        f"{len(stress.variants)} variants, through the served model ({time.perf_counter() - started:.0f} s):\n"
    )
    print(stress_table(rows))
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "stress_suite": [row.to_dict() for row in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
