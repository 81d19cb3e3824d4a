"""Scoring speed on this machine: warm per-image time (decode, preprocess, inference), cold start and peak RSS.

Run with `make bench`; prints a markdown table and merges its figures into bench/results.json.
One thread throughout, as in a Lambda invocation scoring one image at a time.
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scoring.classifier import Classifier
from scoring.preprocessing import decode, resize_for_model

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
SAMPLE = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
RESULTS = ROOT / "bench" / "results.json"
WARM_REPEATS = 200
COLD_REPEATS = 5

COLD_START_PROGRAM = """
import sys, time
started = time.perf_counter()
from pathlib import Path
from scoring.classifier import Classifier
from scoring.scorer import score_files
imported = time.perf_counter()
classifier = Classifier.from_directory(Path(sys.argv[1]))
loaded = time.perf_counter()
[result] = score_files(classifier, [Path(sys.argv[2]).read_bytes()])
scored = time.perf_counter()
print(f"{imported - started} {loaded - imported} {scored - loaded} {result.label}")
"""


def full_resolution_jpeg() -> bytes:
    """A ~2000 px grayscale JPEG of a real X-ray, the size of the originals the 224 px copies came from."""
    image = Image.open(SAMPLE).convert("L").resize((2048, 1856), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p95_ms": round(float(np.percentile(values, 95)), 3)}


def warm_latency(classifier: Classifier, data: bytes) -> dict[str, Any]:
    """Per-stage and total time of scoring one image, after a warm-up."""
    stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "inference": [], "total": []}
    for repeat in range(WARM_REPEATS + 10):
        start = time.perf_counter()
        decoded = decode(data, classifier.input_size)
        decoded_at = time.perf_counter()
        model_input = resize_for_model(decoded, classifier.input_size)
        preprocessed_at = time.perf_counter()
        classifier.predict(model_input.pixels[np.newaxis])
        done = time.perf_counter()
        if repeat >= 10:
            stages["decode"].append(decoded_at - start)
            stages["preprocess"].append(preprocessed_at - decoded_at)
            stages["inference"].append(done - preprocessed_at)
            stages["total"].append(done - start)
    return {name: percentiles(values) for name, values in stages.items()}


def cold_start(image: Path) -> dict[str, Any]:
    """New process -> first result, repeated; the median run and the largest peak RSS."""
    runs = []
    for _ in range(COLD_REPEATS):
        started = time.perf_counter()
        output = subprocess.run(
            [sys.executable, "-c", COLD_START_PROGRAM, str(RELEASE_MODEL), str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        runs.append(
            {
                "total_s": time.perf_counter() - started,
                "imports_s": float(output[0]),
                "model_load_s": float(output[1]),
                "first_score_s": float(output[2]),
            }
        )
    median = sorted(runs, key=lambda run: run["total_s"])[len(runs) // 2]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {**{name: round(value, 3) for name, value in median.items()}, "peak_rss_mb": round(peak_rss_mb, 1)}


def main() -> dict[str, Any]:
    classifier = Classifier.from_directory(RELEASE_MODEL, num_threads=1)
    large = full_resolution_jpeg()
    large_path = ROOT / "bench" / ".full_resolution.jpeg"
    large_path.write_bytes(large)
    figures: dict[str, Any] = {
        "model_version": classifier.spec.version,
        "warm_224px_jpeg": warm_latency(classifier, SAMPLE.read_bytes()),
        "warm_2048px_jpeg": warm_latency(classifier, large),
        "cold_start_224px": cold_start(SAMPLE),
        "full_resolution_jpeg_bytes": len(large),
    }
    large_path.unlink()
    print("| image | decode p50/p95 ms | preprocess p50/p95 ms | inference p50/p95 ms | total p50/p95 ms |")
    print("|---|---|---|---|---|")
    for name in ("warm_224px_jpeg", "warm_2048px_jpeg"):
        row = figures[name]
        cells = [
            f"{row[s]['p50_ms']:.2f} / {row[s]['p95_ms']:.2f}" for s in ("decode", "preprocess", "inference", "total")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    cold = figures["cold_start_224px"]
    print(
        f"\ncold start (new process -> first result): {cold['total_s']:.2f} s "
        f"(imports {cold['imports_s']:.2f} s, model load {cold['model_load_s']:.3f} s, first score "
        f"{cold['first_score_s']:.3f} s); peak RSS {cold['peak_rss_mb']:.0f} MB"
    )
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "scoring": figures}, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
