"""Seconds per SQS batch of 10 through the scoring handler on the local stack, with a modelled AWS latency.

The template's resources (``infra.resources.create_data_plane``) on the local stack's moto server, run in a process
of its own (as AWS runs outside the function's: moto's own work does not take the handler's interpreter), the
release model promoted in its registry. Each round uploads 10 films from samples/ (S3 notifies the scoring queue),
receives the 10 real notifications and hands them to the real handler as one Lambda SQS event; the handler's wall
time is the batch's time. The local stack's event-source emulators are not attached: the bench invokes the handler
itself, so nothing else scores the uploads.

Moto answers in a millisecond or two where AWS takes tens, which would hide what the issue is about: every S3 and
DynamoDB call of the handler's clients first sleeps ``MODELLED_LATENCY_SECONDS`` (30 ms, a typical in-region S3 GET
or DynamoDB PutItem) in a botocore ``before-send`` hook, the last step before a request goes on the wire.

BEFORE is the handler with ``io_concurrency=1`` (each HEAD, GET, heatmap PUT and PutItem in turn, as before issue
20); AFTER is the default (``IO_CONCURRENCY`` 10). Each is warmed up once (its model loaded, as a warm execution
environment holds it), then their rounds are taken in turn so both see the same load on a shared machine. Run with
`make bench`; merges its figures into bench/results.json under ``throughput``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import boto3

from core.model_card import read_card
from core.model_registry import ModelRegistry
from infra.local_stack import LocalContext, drain
from infra.resources import create_data_plane
from pneumoscan.stack import StackOutputs
from scoring import handler
from scoring.pipeline import DEFAULT_IO_CONCURRENCY
from scoring.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MODEL = ROOT / "models" / "release"
SAMPLES = sorted((ROOT / "samples").glob("*/*.jpeg"))
RESULTS = ROOT / "bench" / "results.json"
SQS_EVENT = ROOT / "tests" / "events" / "sqs_event.json"
REGION = "us-east-1"
BATCH = 10
ROUNDS = 10
MODELLED_LATENCY_SECONDS = 0.030
BAR = 3.0
"""The issue's bar: a batch at least this many times shorter than before."""
SERVER = """
import sys
import logging
from infra.moto_atomicity import make_dynamodb_writes_atomic
from moto.server import ThreadedMotoServer
make_dynamodb_writes_atomic()
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""
"""The moto server's process: it prints its port and serves until its standard input closes."""


class ModelledLatency:
    """A botocore ``before-send`` hook that sleeps before every request and counts them."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.requests = 0

    def __call__(self, **_: Any) -> None:
        self.requests += 1  # Counted under the GIL; an approximate count is all the report needs.
        time.sleep(self.seconds)
        # Returning None lets botocore send the request as usual.

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send", self)
        return client


def local_client(service: str, endpoint_url: str) -> Any:
    """A boto3 client of the local stack."""
    return boto3.client(service, region_name=REGION, endpoint_url=endpoint_url)  # type: ignore[call-overload]  # The service name is a plain str here.


def lambda_records(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages received from the queue as the records of Lambda's SQS event."""
    template = json.loads(SQS_EVENT.read_text())["Records"][0]
    records = []
    for message in messages:
        record = copy.deepcopy(template)
        record["messageId"], record["body"] = message["MessageId"], message["Body"]
        records.append(record)
    return records


def settings_for(outputs: StackOutputs, io_concurrency: int) -> Settings:
    """The function's settings on this stack, as the template sets its environment."""
    return Settings(
        results_table=outputs.results_table,
        input_bucket=outputs.input_bucket,
        input_prefix=outputs.input_prefix,
        model_bucket=outputs.model_bucket,
        model_path=None,
        model_refresh_seconds=3600.0,
        model_cache_dir=Path(tempfile.mkdtemp(prefix="pneumoscan-bench-models-")),
        max_image_bytes=50 * 1024 * 1024,
        heatmap_bucket=outputs.heatmap_bucket,
        io_concurrency=io_concurrency,
    )


def one_batch(outputs: StackOutputs, s3: Any, sqs: Any, tag: str) -> float:
    """Upload a batch of films, receive their notifications, invoke the handler once; its wall time in seconds."""
    for index in range(BATCH):
        sample = SAMPLES[index % len(SAMPLES)]
        key = f"{outputs.input_prefix}bench/{tag}/{index}-{sample.name}"
        s3.put_object(Bucket=outputs.input_bucket, Key=key, Body=sample.read_bytes())
    records = lambda_records(drain(sqs, outputs.queue_url))
    if len(records) != BATCH:
        raise RuntimeError(f"expected {BATCH} notifications, received {len(records)}")
    started = time.perf_counter()
    # The handler's EMF lines (one per invocation) would bury the figures.
    with contextlib.redirect_stdout(io.StringIO()):
        response = handler.lambda_handler({"Records": records}, LocalContext(aws_request_id=tag))
    elapsed = time.perf_counter() - started
    if response["batchItemFailures"]:
        raise RuntimeError(f"the batch had failures: {response}")
    return elapsed


@dataclass
class Mode:
    """The handler wired one way (its own pipeline, model and latency-modelled clients) and its batch times."""

    io_concurrency: int
    latency: ModelledLatency
    pipeline: Any
    seconds: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        median = statistics.median(self.seconds)
        return {
            "io_concurrency": self.io_concurrency,
            "seconds_per_batch_median": round(median, 3),
            "seconds_per_batch_min": round(min(self.seconds), 3),
            "seconds_per_batch_max": round(max(self.seconds), 3),
            "images_per_second_per_invocation": round(BATCH / median, 1),
            "aws_requests_per_image": round(self.latency.requests / (len(self.seconds) * BATCH), 2),
        }


def wired(outputs: StackOutputs, endpoint_url: str, io_concurrency: int) -> Mode:
    """The handler's pipeline on latency-modelled S3 and DynamoDB clients."""
    latency = ModelledLatency(MODELLED_LATENCY_SECONDS)
    s3 = latency.attach(local_client("s3", endpoint_url))
    dynamodb = latency.attach(local_client("dynamodb", endpoint_url))
    return Mode(io_concurrency, latency, handler.build_pipeline(settings_for(outputs, io_concurrency), s3, dynamodb))


def measure(outputs: StackOutputs, endpoint_url: str) -> tuple[Mode, Mode]:
    """Before and after, each warmed up once (the model loaded), then their rounds taken in turn, so both see the
    same load on a shared machine."""
    modes = (wired(outputs, endpoint_url, 1), wired(outputs, endpoint_url, DEFAULT_IO_CONCURRENCY))
    s3, sqs = local_client("s3", endpoint_url), local_client("sqs", endpoint_url)
    for mode in modes:
        handler.pipeline.set(mode.pipeline)
        one_batch(outputs, s3, sqs, f"warm-{mode.io_concurrency}")
        mode.latency.requests = 0
    for _ in range(ROUNDS):
        for mode in modes:
            handler.pipeline.set(mode.pipeline)
            mode.seconds.append(one_batch(outputs, s3, sqs, f"{mode.io_concurrency}-{uuid.uuid4().hex[:8]}"))
    return modes


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """The local stack's moto server, in a process of its own as AWS is outside the function's; its endpoint."""
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "functions")])},
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        yield f"http://127.0.0.1:{int(child.stdout.readline())}"
    finally:
        child.stdin.close()  # The server stops when its standard input closes.
        child.wait(timeout=30)


def main() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ["POWERTOOLS_TRACE_DISABLED"] = "1"
    os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"
    handler.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)
    with moto_server() as endpoint_url:
        try:
            s3, sqs = local_client("s3", endpoint_url), local_client("sqs", endpoint_url)
            dynamodb, events = local_client("dynamodb", endpoint_url), local_client("events", endpoint_url)
            outputs = create_data_plane(s3, sqs, dynamodb, events, region=REGION)
            outputs = replace(outputs, endpoint_url=endpoint_url)
            registry = ModelRegistry(s3, outputs.model_bucket)
            registry.publish(RELEASE_MODEL)
            registry.promote(read_card(RELEASE_MODEL)["version"])
            drain(sqs, outputs.queue_url)  # S3's test event, sent when the notification was configured.
            before_mode, after_mode = measure(outputs, endpoint_url)
        finally:
            handler.pipeline.set(None)
    before, after = before_mode.figures(), after_mode.figures()
    ratio = round(before["seconds_per_batch_median"] / after["seconds_per_batch_median"], 2)
    figures = {
        "batch_size": BATCH,
        "rounds": ROUNDS,
        "modelled_latency_ms_per_call": MODELLED_LATENCY_SECONDS * 1000,
        "before": before,
        "after": after,
        "speedup": ratio,
        "bar": BAR,
        "meets_bar": ratio >= BAR,
    }
    print(f"Throughput: a batch of {BATCH} films through the scoring handler on the local stack,")
    print(
        f"with {MODELLED_LATENCY_SECONDS * 1000:.0f} ms modelled before every S3 and DynamoDB call ({ROUNDS} rounds):"
    )
    for name, run in (
        ("before (IO_CONCURRENCY=1)", before),
        (f"after (IO_CONCURRENCY={DEFAULT_IO_CONCURRENCY})", after),
    ):
        print(
            f"  {name:<26} {run['seconds_per_batch_median']:.3f} s per batch (median; "
            f"{run['seconds_per_batch_min']:.3f}-{run['seconds_per_batch_max']:.3f}), "
            f"{run['images_per_second_per_invocation']:.1f} images/s per unit of concurrency, "
            f"{run['aws_requests_per_image']:.2f} AWS requests per image"
        )
    print(f"  {ratio:.2f}x shorter (bar: {BAR:.0f}x) -> {'met' if ratio >= BAR else 'NOT met'}")
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**existing, "throughput": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
