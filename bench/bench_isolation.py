"""What decoding every image in a forked child costs against decoding it in the function's own process.

The scoring function decodes a first delivery in its own process and only the records of a batch holding a
redelivered one in a forked child (``scoring/isolated_decode.py``). Issue 19 asked whether isolating every decode
is cheap enough: under about 10% of the per-image time. Here a 2,000 x 1,800 baseline JPEG film (a clinical film's
size) is decoded and resized for the model, as the pipeline does, in process and through ``decode_isolated``
(copy-on-write fork, result as plain bytes through a pipe), with the release model loaded as the function has it,
so the fork copies the page tables of a process of the function's size. The per-image time the ratio is taken
against is the whole per-image cost: the decode plus the model's inference of one image.

    .venv/bin/python bench/bench_isolation.py

`make bench` runs it and merges the figures into bench/results.json.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "functions")]

from core.preprocessing import decode, resize_for_model  # noqa: E402  # After the path set-up above.
from scoring.classifier import Classifier  # noqa: E402
from scoring.isolated_decode import decode_isolated  # noqa: E402

FILM = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
MODEL = ROOT / "models" / "release"
RESULTS = ROOT / "bench" / "results.json"
ROUNDS = 30


def _median_ms(run: Callable[[], object], rounds: int = ROUNDS) -> float:
    """The median wall time of ``run`` in milliseconds, after one warm-up run."""
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    classifier = Classifier.from_directory(MODEL)
    size = classifier.input_size
    buffer = io.BytesIO()
    Image.open(FILM).convert("L").resize((2_000, 1_800), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    pixels = resize_for_model(decode(data, size), size).pixels[np.newaxis]
    in_process = _median_ms(lambda: resize_for_model(decode(data, size), size))
    forked = _median_ms(lambda: decode_isolated(data, size))
    inference = _median_ms(lambda: classifier.predict(pixels))
    per_image = in_process + inference
    added = forked - in_process
    figures = {
        "film": "2,000 x 1,800 baseline JPEG, quality 90",
        "decode_in_process_ms": round(in_process, 2),
        "decode_forked_child_ms": round(forked, 2),
        "inference_ms": round(inference, 2),
        "added_ms": round(added, 2),
        "added_share_of_decode": round(added / in_process, 3),
        "added_share_of_per_image": round(added / per_image, 3),
    }
    print(f"Decoding every image in a forked child, {figures['film']} (median of {ROUNDS}):")
    print(f"  in process      {in_process:7.2f} ms (decode and resize)")
    print(f"  forked child    {forked:7.2f} ms (+{added:.2f} ms, {added / in_process:.0%} of the decode)")
    print(f"  inference       {inference:7.2f} ms; per image in process {per_image:.2f} ms")
    print(f"  isolation adds  {added / per_image:.0%} of the per-image time (the rule: isolate every decode under 10%)")
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "isolation": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
