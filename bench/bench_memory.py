"""Whole-process wall time and peak memory of `pneumoscan score` on 1, 10 and 64 files, beside a TensorFlow Xception
classifier scoring the same files, and the scoring function's peak memory on SQS batches of 1 and 10 records.

Each figure is the median of paired runs (ours, then the reference, one after the other, five pairs): a process's
wall time from its start to its exit, and its peak resident memory (``ru_maxrss`` of the finished child, which
counts the interpreter, every import and the model). The files are the first films of the test split's two
classes: they are only timed, their results are discarded unread (no accuracy is computed on the test split).

The scoring function's figure is the memory one invocation adds to the warm function at rest: the Lambda handler
runs on moto in a child process, once to load the model, then on a batch of 1 and of 10 ~2,000 px films.

Run with `make bench`; merges its figures into bench/results.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
DATA = Path(os.environ.get("PNEUMOSCAN_DATA", ROOT.parent / "shared" / "data" / "chest_xray"))
FILE_COUNTS = (1, 10, 64)
PAIRS = 5
FUNCTION_BATCHES = (1, 10)
BARS = {"wall ratio to TensorFlow Xception, 64 files": 0.05, "peak memory, 64 files (MiB)": 250.0}
"""The targets of whole-process scoring of 64 files."""
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "POWERTOOLS_TRACE_DISABLED": "1"}

XCEPTION_PEER = """
import sys
import numpy as np
import tensorflow as tf
from PIL import Image

model = tf.keras.applications.Xception(weights=None, input_shape=(224, 224, 3), classes=2)
pixels = np.stack([
    np.asarray(Image.open(path).convert("RGB").resize((224, 224)), dtype=np.float32) / 127.5 - 1.0
    for path in sys.argv[1:]
])
for path, probabilities in zip(sys.argv[1:], model.predict(pixels, batch_size=32, verbose=0)):
    print(path, float(probabilities[1]))
"""
"""The reference: an untrained Xception classifier (the architecture, not its answers, is what costs), one process
that decodes the files, resizes them to its input and scores them in batches of 32, as Keras' predict does."""

FUNCTION_CHILD = """
import copy, io, json, os, sys
from pathlib import Path

import boto3
from moto import mock_aws
from PIL import Image

from core.model_card import read_card
from core.model_registry import ModelRegistry
from infra.local_stack import LocalContext, drain
from infra.resources import create_data_plane
from scoring import handler
from scoring.settings import Settings

model, film, cache = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
batches = [int(count) for count in sys.argv[4:]]


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def films(count, seed):
    # Distinct ~2,000 px films, as a clinic uploads them: the sample enlarged, each a little different.
    base = Image.open(film).convert("L").resize((2048, 1856), Image.Resampling.BICUBIC)
    payloads = []
    for number in range(count):
        buffer = io.BytesIO()
        base.rotate((seed * 10 + number) % 7 - 3).save(buffer, format="JPEG", quality=92)
        payloads.append(buffer.getvalue())
    return payloads


with mock_aws():
    s3, sqs, dynamodb, events = (
        boto3.client(name, region_name="us-east-1") for name in ("s3", "sqs", "dynamodb", "events")
    )
    outputs = create_data_plane(s3, sqs, dynamodb, events, region="us-east-1")
    registry = ModelRegistry(s3, outputs.model_bucket)
    registry.publish(model)
    registry.promote(read_card(model)["version"])
    settings = Settings.from_environment({
        "RESULTS_TABLE": outputs.results_table, "INPUT_BUCKET": outputs.input_bucket,
        "INPUT_PREFIX": outputs.input_prefix, "MODEL_BUCKET": outputs.model_bucket, "MODEL_CACHE_DIR": cache,
        "MAX_IMAGE_BYTES": str(20 * 2**20), "HEATMAP_BUCKET": outputs.heatmap_bucket,
    })
    handler.pipeline.set(handler.build_pipeline(settings, s3, dynamodb))
    drain(sqs, outputs.queue_url)  # The notification's s3:TestEvent.

    def invoke(count, seed):
        for number, payload in enumerate(films(count, seed)):
            s3.put_object(Bucket=outputs.input_bucket, Key=f"{outputs.input_prefix}{seed}/{number}.jpeg", Body=payload)
        records = [
            {"messageId": message["MessageId"], "body": message["Body"], "attributes": {"ApproximateReceiveCount": "1"},
             "eventSource": "aws:sqs", "receiptHandle": message["ReceiptHandle"]}
            for message in drain(sqs, outputs.queue_url)
        ]
        assert len(records) == count, len(records)
        # The peak is measured from here: Linux resets VmHWM to the current RSS on "5" written to clear_refs.
        Path("/proc/self/clear_refs").write_text("5")
        resting = status("VmRSS")
        response = handler.lambda_handler({"Records": records}, LocalContext(aws_request_id=f"bench-{seed}"))
        assert response == {"batchItemFailures": []}, response
        return resting, status("VmHWM")

    invoke(1, 0)  # Loads the model, as the first invocation of a warm function did.
    figures = {}
    for seed, count in enumerate(batches, start=1):
        resting, peak = invoke(count, seed)
        figures[str(count)] = {"resting_rss_mb": round(resting, 1), "peak_rss_mb": round(peak, 1),
                               "added_mb": round(peak - resting, 1)}
    print(json.dumps(figures))
"""


def test_films() -> list[Path]:
    """The first films of each class of the test split, NORMAL and PNEUMONIA in turn, for timing only."""
    normal = sorted((DATA / "test" / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((DATA / "test" / "PNEUMONIA").glob("*.jpeg"))
    films = [film for pair in zip(normal, pneumonia, strict=False) for film in pair]
    if len(films) < max(FILE_COUNTS):
        raise RuntimeError(f"{DATA / 'test'} has fewer than {max(FILE_COUNTS)} films")
    return films[: max(FILE_COUNTS)]


def whole_process(command: list[str]) -> tuple[float, float]:
    """Wall seconds from start to exit and peak RSS (MiB) of one process; its output is discarded unread."""
    started = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **QUIET}
    )
    assert child.stderr is not None
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:4]} failed: {errors.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def paired(count: int, films: list[Path]) -> dict[str, Any]:
    """Medians of ``PAIRS`` paired runs of `pneumoscan score` and the reference on the first ``count`` films."""
    paths = [str(film) for film in films[:count]]
    ours = [sys.executable, "-m", "pneumoscan.cli", "score", *paths]
    reference = [sys.executable, "-c", XCEPTION_PEER, *paths]
    runs: dict[str, list[tuple[float, float]]] = {"pneumoscan": [], "tensorflow": []}
    for _ in range(PAIRS):
        runs["pneumoscan"].append(whole_process(ours))
        runs["tensorflow"].append(whole_process(reference))
    figures: dict[str, Any] = {"files": count}
    for name, measured in runs.items():
        figures[name] = {
            "wall_s": round(statistics.median(wall for wall, _ in measured), 3),
            "peak_rss_mb": round(statistics.median(peak for _, peak in measured), 1),
            "wall_s_runs": [round(wall, 3) for wall, _ in measured],
        }
    figures["wall_ratio"] = round(figures["pneumoscan"]["wall_s"] / figures["tensorflow"]["wall_s"], 4)
    figures["memory_ratio"] = round(figures["pneumoscan"]["peak_rss_mb"] / figures["tensorflow"]["peak_rss_mb"], 4)
    return figures


def function_batches(scratch: Path) -> dict[str, Any]:
    """The scoring function's resting RSS and peak on batches of ``FUNCTION_BATCHES`` records (one child on moto)."""
    film = ROOT / "samples" / "PNEUMONIA" / "person100_bacteria_475.jpeg"
    model = ROOT / "models" / "release"
    command = [sys.executable, "-c", FUNCTION_CHILD, str(model), str(film), str(scratch)]
    result = subprocess.run(
        command + [str(count) for count in FUNCTION_BATCHES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **QUIET, "AWS_DEFAULT_REGION": "us-east-1"},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the function's memory run failed: {result.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def main() -> dict[str, Any]:
    import tempfile  # noqa: PLC0415  # Only main needs a scratch folder.

    films = test_films()
    cli = {str(count): paired(count, films) for count in FILE_COUNTS}
    with tempfile.TemporaryDirectory() as scratch:
        function = function_batches(Path(scratch))
    largest = cli[str(max(FILE_COUNTS))]
    measured = {
        "wall ratio to TensorFlow Xception, 64 files": largest["wall_ratio"],
        "peak memory, 64 files (MiB)": largest["pneumoscan"]["peak_rss_mb"],
    }
    bars = {name: {"bar": bar, "measured": measured[name], "met": measured[name] <= bar} for name, bar in BARS.items()}
    print_tables(cli, function, bars)
    figures = {"pairs": PAIRS, "cli": cli, "function": function, "bars": bars}
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "memory": figures}, indent=2) + "\n")
    return figures


def print_tables(cli: dict[str, Any], function: dict[str, Any], bars: dict[str, dict[str, Any]]) -> None:
    """Markdown: whole-process figures beside the reference, the function's batches, then the bars."""
    print(
        "| files | pneumoscan score: wall s / peak MiB | TensorFlow Xception: wall s / peak MiB | wall ratio "
        "| memory ratio |\n|---|---|---|---|---|"
    )
    for count, row in cli.items():
        ours, reference = row["pneumoscan"], row["tensorflow"]
        print(
            f"| {count} | {ours['wall_s']:.2f} / {ours['peak_rss_mb']:.0f} | {reference['wall_s']:.2f} / "
            f"{reference['peak_rss_mb']:.0f} | {row['wall_ratio']:.3f} | {row['memory_ratio']:.3f} |"
        )
    print(f"(medians of {PAIRS} paired runs)\n")
    print("| scoring function, records | resting RSS MiB | peak RSS MiB | added MiB |\n|---|---|---|---|")
    for count, row in function.items():
        print(f"| {count} | {row['resting_rss_mb']} | {row['peak_rss_mb']} | {row['added_mb']} |")
    print("\n| target | bar | measured | met |\n|---|---|---|---|")
    for name, row in bars.items():
        print(f"| {name} | <= {row['bar']} | {row['measured']} | {'yes' if row['met'] else 'NO'} |")


if __name__ == "__main__":
    main()
