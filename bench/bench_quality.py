"""Quality of the served artifact on the test split, recomputed from scratch through `pneumoscan score`.

Every test image goes through the command users run; labels come from the folder names; the metrics (with
bootstrap 95% intervals) are printed next to what the model card claims. Run with `make bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from scoring.model_card import read_card
from training.metrics import METRIC_NAMES, evaluate

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
RESULTS = ROOT / "bench" / "results.json"


def score_with_cli(model: Path, paths: list[Path]) -> list[dict[str, Any]]:
    """Run `pneumoscan score` over the files and parse its JSON lines."""
    command = [str(Path(sys.executable).parent / "pneumoscan"), "score", "--model", str(model), *map(str, paths)]
    output = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    return [json.loads(line) for line in output.splitlines()]


def main() -> dict[str, Any]:
    data = Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data" / "chest_xray"))
    paths = sorted((data / "test").glob("*/*"))
    lines = score_with_cli(RELEASE_MODEL, paths)
    errors = [line for line in lines if "error" in line]
    if errors or len(lines) != len(paths):
        raise SystemExit(f"{len(errors)} test images could not be scored: {errors[:3]}")
    labels = np.array([Path(line["path"]).parent.name == "PNEUMONIA" for line in lines], dtype=int)
    probabilities = np.array([line["pneumonia_probability"] for line in lines])
    card = read_card(RELEASE_MODEL)
    threshold = float(card["calibration"]["threshold"])
    measured: dict[str, Any] = evaluate(labels, probabilities, threshold, resamples=2000).to_dict()
    claimed = card["metrics"]["test"]
    print(f"model {card['version']} on {len(lines)} test images, threshold {threshold:.4f} (chosen on validation)\n")
    print("| metric | recomputed (95% CI) | model card |")
    print("|---|---|---|")
    for name in METRIC_NAMES:
        value = measured[name]
        print(
            f"| {name} | {value['value']:.4f} ({value['low']:.4f}-{value['high']:.4f}) | {claimed[name]['value']:.4f} |"
        )
    print(f"\nconfusion matrix: {measured['confusion_matrix']}")
    figures = {"model_version": card["version"], "test_images": len(lines), "recomputed": measured, "card": claimed}
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "quality": figures}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
