"""Scoring speed on this machine, LiteRT (what is served) side by side with full TensorFlow/Keras.

Warm per-image latency split into decode, preprocess and inference (224 px and ~2000 px JPEG); throughput per
core for batches of 1 and 10; cold start (new process -> first result) with peak RSS; the latency an explained
image adds (the explainer's inference and the heatmap overlay PNG of a ~2000 px film). One thread throughout, as
in a Lambda invocation. Run with `make bench`; merges its figures into bench/results.json.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.model_card import EXPLAINER_FILE
from core.preprocessing import decode, resize_for_model
from scoring.classifier import Classifier
from scoring.explainer import render_overlay

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
RELEASE_KERAS = ROOT / "models" / "release-keras" / "model.keras"
"""The release model's Keras form, kept outside the served artifact only for this comparison."""
SAMPLE = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
RESULTS = ROOT / "bench" / "results.json"
WARM_REPEATS = 200
COLD_REPEATS = 3
THROUGHPUT_IMAGES = 200
ONE_THREAD = {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}

LITERT_COLD_START = """
import sys, time
started = time.perf_counter()
from pathlib import Path
import scoring.handler  # The Lambda's own imports: boto3, Powertools.
from scoring.classifier import Classifier
from scoring.scorer import score_files
imported = time.perf_counter()
classifier = Classifier.from_directory(Path(sys.argv[1]))
loaded = time.perf_counter()
[result] = score_files(classifier, [Path(sys.argv[2]).read_bytes()])
print(imported - started, loaded - imported, time.perf_counter() - loaded)
"""

KERAS_COLD_START = """
import sys, time
started = time.perf_counter()
from pathlib import Path
import keras, tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import training.models  # Registers the custom layer of the saved model.
from core.preprocessing import preprocess
imported = time.perf_counter()
model = keras.saving.load_model(sys.argv[3], compile=False)
infer = tf.function(lambda pixels: model(pixels, training=False), reduce_retracing=True)
loaded = time.perf_counter()
pixels = preprocess(Path(sys.argv[2]).read_bytes(), size=model.input_shape[1]).pixels
infer(pixels[None])
print(imported - started, loaded - imported, time.perf_counter() - loaded)
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


def warm_latency(infer: Callable[[np.ndarray], Any], size: int, data: bytes) -> dict[str, Any]:
    """Per-stage and total time of scoring one image, after a warm-up."""
    stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "inference": [], "total": []}
    for repeat in range(WARM_REPEATS + 10):
        start = time.perf_counter()
        decoded = decode(data, size)
        decoded_at = time.perf_counter()
        model_input = resize_for_model(decoded, size)
        preprocessed_at = time.perf_counter()
        infer(model_input.pixels[np.newaxis])
        done = time.perf_counter()
        if repeat >= 10:
            stages["decode"].append(decoded_at - start)
            stages["preprocess"].append(preprocessed_at - decoded_at)
            stages["inference"].append(done - preprocessed_at)
            stages["total"].append(done - start)
    return {name: percentiles(values) for name, values in stages.items()}


def throughput(infer: Callable[[np.ndarray], Any], size: int, data: bytes, batch: int) -> float:
    """Images per second on one core: decode, preprocess and infer in batches of ``batch``."""
    infer(np.stack([resize_for_model(decode(data, size), size).pixels] * batch))
    started = time.perf_counter()
    for _ in range(THROUGHPUT_IMAGES // batch):
        infer(np.stack([resize_for_model(decode(data, size), size).pixels for _ in range(batch)]))
    return round(THROUGHPUT_IMAGES / (time.perf_counter() - started), 1)


def explainer_latency(classifier: Classifier, large: bytes) -> dict[str, Any]:
    """What explaining one image adds to scoring it, p50 and p95: the explainer's inference on the model input,
    then the overlay PNG, rendered as the pipeline does on the decoded film. A large JPEG is decoded at reduced
    scale (draft mode), so its overlay is small; a PNG or DICOM film arrives at full resolution, the worst case,
    measured on the same ~2000 px film decoded fully."""
    explainer = classifier.explainer
    if explainer is None:
        raise RuntimeError(f"{RELEASE_MODEL} has no explainer; the training job exports one for a pooled-linear head")
    size = classifier.input_size
    decoded = decode(large, size)
    pixels = resize_for_model(decoded, size).pixels[np.newaxis]
    full = Image.open(io.BytesIO(large)).convert("L")
    full.load()
    films = {"jpeg": decoded.grayscale, "full_resolution": full}
    stages: dict[str, list[float]] = {"inference": [], "overlay_jpeg": [], "overlay_full_resolution": []}
    overlays: dict[str, bytes] = {}
    for repeat in range(WARM_REPEATS + 10):
        start = time.perf_counter()
        contribution_map = explainer.maps(pixels)[0]
        elapsed = {"inference": time.perf_counter() - start}
        for name, film in films.items():
            start = time.perf_counter()
            overlays[name] = render_overlay(film, contribution_map)
            elapsed[f"overlay_{name}"] = time.perf_counter() - start
        if repeat >= 10:
            for stage, seconds in elapsed.items():
                stages[stage].append(seconds)
    return {
        "grid": explainer.grid,
        **{
            f"{name}_px": {"film": list(film.size), "overlay": list(Image.open(io.BytesIO(overlays[name])).size)}
            for name, film in films.items()
        },
        "overlay_png_bytes": {name: len(png) for name, png in overlays.items()},
        **{name: percentiles(values) for name, values in stages.items()},
    }


def cold_start(program: str) -> dict[str, float]:
    """New process -> first result: the median of a few runs, and the largest peak RSS of one process."""
    runs = []
    for _ in range(COLD_REPEATS):
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", program, str(RELEASE_MODEL), str(SAMPLE), str(RELEASE_KERAS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **ONE_THREAD, "TF_CPP_MIN_LOG_LEVEL": "3", "POWERTOOLS_TRACE_DISABLED": "1"},
        )
        assert child.stdout is not None
        output = child.stdout.read().split()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"cold-start program failed with exit code {child.returncode}")
        runs.append(
            {
                "total_s": time.perf_counter() - started,
                "imports_s": float(output[0]),
                "model_load_s": float(output[1]),
                "first_score_s": float(output[2]),
                "peak_rss_mb": usage.ru_maxrss / 1024,
            }
        )
    median = sorted(runs, key=lambda run: run["total_s"])[len(runs) // 2]
    return {name: round(value, 3) for name, value in median.items()}


def keras_inference() -> tuple[Callable[[np.ndarray], Any], int]:
    """The same model through full TensorFlow/Keras, one thread: the usual Lambda container approach."""
    import keras  # noqa: PLC0415  # TensorFlow is only for the comparison.
    import tensorflow as tf  # noqa: PLC0415

    import training.models  # noqa: F401, PLC0415  # Registers the saved model's custom layer.

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = keras.saving.load_model(RELEASE_KERAS, compile=False)
    # A graph function, as a careful TensorFlow deployment would serve it; eager calls are several times slower.
    infer = tf.function(lambda pixels: model(pixels, training=False), reduce_retracing=True)
    return (lambda pixels: infer(pixels).numpy()), int(model.input_shape[1])


def measure(name: str, infer: Callable[[np.ndarray], Any], size: int, large: bytes, program: str) -> dict[str, Any]:
    small = SAMPLE.read_bytes()
    return {
        "runtime": name,
        "warm_224px_jpeg": warm_latency(infer, size, small),
        "warm_2048px_jpeg": warm_latency(infer, size, large),
        "images_per_second_per_core_batch_1": throughput(infer, size, small, 1),
        "images_per_second_per_core_batch_10": throughput(infer, size, small, 10),
        "cold_start": cold_start(program),
    }


def main() -> dict[str, Any]:
    classifier = Classifier.from_directory(RELEASE_MODEL, num_threads=1)
    large = full_resolution_jpeg()
    litert = measure("LiteRT", classifier.logits, classifier.input_size, large, LITERT_COLD_START)
    explained = explainer_latency(classifier, large)
    keras_infer, keras_size = keras_inference()
    keras_figures = measure("TensorFlow/Keras", keras_infer, keras_size, large, KERAS_COLD_START)
    figures: dict[str, Any] = {
        "model_version": classifier.spec.version,
        "litert": litert,
        "tensorflow": keras_figures,
        "explainer": explained,
        "model_bytes": {
            "model.tflite": (RELEASE_MODEL / "model.tflite").stat().st_size,
            "model.keras": RELEASE_KERAS.stat().st_size,
            EXPLAINER_FILE: (RELEASE_MODEL / EXPLAINER_FILE).stat().st_size,
        },
    }
    print_tables(litert, keras_figures, explained)
    figures["bars"] = check_bars(litert, figures["model_bytes"]["model.tflite"])
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "scoring": figures}, indent=2) + "\n")
    return figures


SPEED_BARS = {
    "warm full-resolution JPEG to result, p50 (ms)": 15.0,
    "cold start to first result (s)": 1.0,
    "served model file (MB)": 20.0,
}
"""The speed and size targets of the served model, one thread."""


def check_bars(litert: dict[str, Any], model_bytes: int) -> dict[str, dict[str, Any]]:
    """Each target beside its measured figure, printed and returned for results.json."""
    measured = {
        "warm full-resolution JPEG to result, p50 (ms)": litert["warm_2048px_jpeg"]["total"]["p50_ms"],
        "cold start to first result (s)": litert["cold_start"]["total_s"],
        "served model file (MB)": round(model_bytes / 1e6, 2),
    }
    print("\n| target | bar | measured | met |\n|---|---|---|---|")
    bars = {}
    for name, bar in SPEED_BARS.items():
        met = measured[name] <= bar
        print(f"| {name} | <= {bar} | {measured[name]} | {'yes' if met else 'NO'} |")
        bars[name] = {"bar": bar, "measured": measured[name], "met": met}
    return bars


def print_tables(litert: dict[str, Any], keras_figures: dict[str, Any], explained: dict[str, Any]) -> None:
    """Markdown: per-stage latency of each runtime, the side-by-side with ratios, then what an explained image adds."""
    print("| runtime | image | decode p50/p95 ms | preprocess p50/p95 ms | inference p50/p95 ms | total p50/p95 ms |")
    print("|---|---|---|---|---|---|")
    for figures in (litert, keras_figures):
        for image in ("warm_224px_jpeg", "warm_2048px_jpeg"):
            row = figures[image]
            stages = ("decode", "preprocess", "inference", "total")
            cells = [f"{row[stage]['p50_ms']:.2f} / {row[stage]['p95_ms']:.2f}" for stage in stages]
            print(f"| {figures['runtime']} | {image} | " + " | ".join(cells) + " |")
    rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("warm total p50, 2048 px (ms)", lambda f: f["warm_2048px_jpeg"]["total"]["p50_ms"]),
        ("warm inference p50 (ms)", lambda f: f["warm_224px_jpeg"]["inference"]["p50_ms"]),
        ("images/s/core, batch 1", lambda f: f["images_per_second_per_core_batch_1"]),
        ("images/s/core, batch 10", lambda f: f["images_per_second_per_core_batch_10"]),
        ("cold start (s)", lambda f: f["cold_start"]["total_s"]),
        ("cold start peak RSS (MB)", lambda f: f["cold_start"]["peak_rss_mb"]),
    ]
    print("\n| figure | LiteRT | TensorFlow/Keras | TensorFlow / LiteRT |\n|---|---|---|---|")
    for label, pick in rows:
        served, full = pick(litert), pick(keras_figures)
        print(f"| {label} | {served} | {full} | {full / served:.2f}x |")
    print("\n| explained image (LiteRT) | p50/p95 ms |\n|---|---|")
    explained_rows = [("inference", f"explainer inference ({explained['grid']} x {explained['grid']} map)")]
    for name, label in (("jpeg", "JPEG, draft-decoded"), ("full_resolution", "PNG/DICOM, full resolution")):
        (width, height), (overlay_width, overlay_height) = explained[f"{name}_px"].values()
        explained_rows.append(
            (f"overlay_{name}", f"overlay PNG, {label} {width} x {height} -> {overlay_width} x {overlay_height}")
        )
    for stage, label in explained_rows:
        print(f"| {label} | {explained[stage]['p50_ms']:.2f} / {explained[stage]['p95_ms']:.2f} |")


if __name__ == "__main__":
    main()
