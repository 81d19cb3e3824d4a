"""int8 beside float32 for the release's weights, by the exporter's own rule, on validation films only.

Converts the release's Keras model both ways exactly as the exporter does (int8: representative fit films with mild
acquisition variants, the layers the quantization debugger measures as quantizing badly kept float), measures
both against the Keras model on the validation films (largest probability difference, label flips far from the
operating points, AUC: the parity gate's figures) and times their inference on one thread, interleaved in the same
run, with the ratio. The test split is never read. Run with `make bench`; merges its figures into
bench/results.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import keras
import numpy as np

import training.efficientnet_lite  # Registers the custom layers of saved EfficientNet-Lite models.
import training.models  # noqa: F401  # Registers the custom layer of the saved models.
from core.model_card import ServingSpec, read_card
from scoring.litert import ClassifierModel
from training.calibration import sigmoid
from training.data import load_images, split_as_trained
from training.export import (
    AUC_TOLERANCE,
    PARITY_TOLERANCE,
    ExportCandidate,
    ParityCheck,
    badly_quantized,
    layer_errors,
    layer_name,
    representative_films,
)
from training.gate import serving_model
from training.train import predict_logits

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
RELEASE_KERAS = ROOT / "models" / "release-keras" / "model.keras"
RESULTS = ROOT / "bench" / "results.json"
TIMED_RUNS = 300
"""Single-film inferences timed per model, alternating between the two so both see the same machine load."""
WORST_LAYERS = 5


def paired_milliseconds(paths: dict[str, Path], film: np.ndarray) -> dict[str, float]:
    """Median single-film inference time of each model, one thread, runs interleaved."""
    models = {name: ClassifierModel(path) for name, path in paths.items()}
    for model in models.values():
        model.run(film)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(TIMED_RUNS):
        for name, model in models.items():
            started = time.perf_counter()
            model.run(film)
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * float(np.median(values)) for name, values in times.items()}


def main() -> dict[str, Any]:
    data = Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data" / "chest_xray"))
    card = read_card(RELEASE_MODEL)
    fit_files, validation_files, _ = split_as_trained(card, data, RuntimeError)
    spec = ServingSpec.from_card(card)
    size = spec.input_size
    validation = load_images(validation_files, size=size)
    temperature, intercept, points = spec.temperature, spec.intercept, spec.points
    classifier = keras.saving.load_model(RELEASE_KERAS, compile=False)
    keras_probabilities = sigmoid(predict_logits(classifier, validation.images), temperature, intercept)
    served = serving_model(classifier)
    representative = representative_films(fit_files, size, seed=int(card["hyperparameters"]["seed"]))
    # The converter prints its saved-model summary on stdout; the figures are what this bench prints there.
    with contextlib.redirect_stdout(sys.stderr):
        errors = layer_errors(served, representative)
    float_layers = badly_quantized(errors)
    candidates: dict[str, ExportCandidate] = {}
    check = ParityCheck(validation, keras_probabilities, temperature, points, intercept)
    with tempfile.TemporaryDirectory() as scratch:
        paths: dict[str, Path] = {}
        for name, kept_float in (("float32", ()), ("int8", float_layers)):
            with contextlib.redirect_stdout(sys.stderr):
                candidates[name], model_bytes = check.convert_and_measure(served, name, representative, kept_float)
            paths[name] = Path(scratch) / f"{name}.tflite"
            paths[name].write_bytes(model_bytes)
        milliseconds = paired_milliseconds(paths, validation.images[:1])
    ratio = milliseconds["float32"] / milliseconds["int8"]
    print(
        f"release {card['version']} (served: {card['export']['chosen']}), {len(validation)} validation films, "
        f"{len(representative)} representative images; parity tolerance {PARITY_TOLERANCE}, AUC tolerance "
        f"{AUC_TOLERANCE}\n"
    )
    print("| model | ms per film (p50, 1 thread) | MB | validation AUC | max probability difference | far flips |")
    print("|---|---|---|---|---|---|")
    for name, candidate in candidates.items():
        print(
            f"| {name} | {milliseconds[name]:.2f} | {candidate.size_bytes / 1e6:.1f} | {candidate.validation_auc:.4f} "
            f"| {candidate.max_probability_difference:.4f} | {candidate.label_flips} |"
        )
    int8 = candidates["int8"]
    print(f"\nKeras validation AUC {int8.keras_validation_auc:.4f}; int8 is {ratio:.2f}x faster than float32")
    verdict = "passes" if int8.passes else f"fails: {'; '.join(int8.failures)}"
    print(f"int8 {verdict}; kept float: {', '.join(int8.float_layers) or 'none'}")
    worst = sorted(errors, key=lambda error: -error.error_in_steps)[:WORST_LAYERS]
    print("worst layers (RMS error in quantization steps; rounding alone is 0.29):")
    for error in worst:
        print(f"  {error.error_in_steps:.2f}  {error.operation}  {layer_name(error.tensor)}")
    figures = {
        "model_version": card["version"],
        "validation_films": len(validation),
        "milliseconds_per_film": milliseconds,
        "speedup": ratio,
        "candidates": {name: {**asdict(c), "passes": c.passes} for name, c in candidates.items()},
        "worst_layers": [
            {"layer": layer_name(e.tensor), "operation": e.operation, "error_in_steps": e.error_in_steps} for e in worst
        ],
    }
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "int8": figures}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
