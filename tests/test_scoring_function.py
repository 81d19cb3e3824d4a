"""The scoring Lambda on moto: upload -> S3 notification -> SQS -> handler -> results table.

Resources come from template.yaml; the model is the committed release artifact, published and promoted in the
moto model bucket exactly as in production.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import io
import json
import logging
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from moto import mock_aws
from PIL import Image, ImageOps

from core import screening
from core.config import ConfigurationError
from core.events import BackfillRequest
from core.model_card import read_card
from core.model_registry import ModelRegistry
from core.population import AgeRange, outside_detail
from core.results import NEVER_NOTIFIED, ResultsTable
from infra.corpus import (
    PATIENT_MARKERS,
    decode_cost_bombs,
    dicom_bytes,
    hostile_files,
    patient_data_files,
    valid_variants,
)
from infra.dicom_bombs import codestream_larger_than_header
from infra.dicom_films import with_patient_age
from infra.fault_injection import FaultInjectingClient
from infra.lambda_process import LambdaLimits, LambdaProcess
from infra.local_stack import LocalContext, drain, scan_results
from infra.non_radiographs import non_radiographs
from infra.resources import create_data_plane
from infra.template import load_template
from pneumoscan.stack import StackOutputs
from publisher.handler import result_detail
from scoring import handler, isolated_decode
from scoring import pipeline as pipeline_module
from scoring.isolated_decode import OVER_BUDGET_DETAIL, TIMEOUT_DETAIL, IsolationLimits
from scoring.settings import Settings
from tests.conftest import RELEASE_MODEL, SAMPLES

EVENTS = Path(__file__).parent / "events"
REGION = "us-east-1"
MAX_IMAGE_BYTES = 2 * 1024 * 1024
FILM = SAMPLES / "PNEUMONIA" / "person100_bacteria_475.jpeg"
HOSTILE = {item.name: item for item in hostile_files(Image.open(FILM).convert("L"), MAX_IMAGE_BYTES)}
VALID = {item.name: item for item in valid_variants(Image.open(FILM).convert("L"))}


def load_event(name: str) -> dict[str, Any]:
    """An event fixture from tests/events."""
    event: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return event


def faulty(client: Any, operation: str, code: str) -> FaultInjectingClient:
    """A client whose ``operation`` always fails with ``code``."""
    return FaultInjectingClient(client, {operation: (1.0, code)}, random.Random(0))


@dataclass
class Stack:
    outputs: StackOutputs
    s3: Any
    sqs: Any
    dynamodb: Any

    def upload(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.outputs.input_bucket, Key=key, Body=body)

    def receive(self) -> list[dict[str, Any]]:
        """Every message waiting in the scoring queue, as Lambda's SQS event records."""
        return [
            sqs_record(message["MessageId"], message["Body"]) for message in drain(self.sqs, self.outputs.queue_url)
        ]

    def results(self) -> list[dict[str, Any]]:
        return scan_results(self.dynamodb, self.outputs.results_table)

    def latest(self, key: str) -> dict[str, Any] | None:
        table = ResultsTable(self.dynamodb, self.outputs.results_table)
        return table.latest(f"s3://{self.outputs.input_bucket}/{key}")


def sqs_record(message_id: str, body: str) -> dict[str, Any]:
    record: dict[str, Any] = copy.deepcopy(load_event("sqs_event.json")["Records"][0])
    record["messageId"] = message_id
    record["body"] = body
    return record


def invoke(records: list[dict[str, Any]]) -> dict[str, Any]:
    response: dict[str, Any] = handler.lambda_handler(
        {"Records": records}, LocalContext(aws_request_id="test-invocation")
    )
    return response


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Stack]:
    """The template's resources on moto, the release model promoted, and the handler wired to them."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        events = boto3.client("events", region_name=REGION)
        outputs = create_data_plane(s3, sqs, dynamodb, events, region=REGION)
        registry = ModelRegistry(s3, outputs.model_bucket)
        registry.publish(RELEASE_MODEL)
        registry.promote(read_card(RELEASE_MODEL)["version"])
        settings = Settings.from_environment(
            {
                "RESULTS_TABLE": outputs.results_table,
                "INPUT_BUCKET": outputs.input_bucket,
                "INPUT_PREFIX": outputs.input_prefix,
                "MODEL_BUCKET": outputs.model_bucket,
                "MODEL_CACHE_DIR": str(tmp_path / "models"),
                "MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
                "HEATMAP_BUCKET": outputs.heatmap_bucket,
            }
        )
        handler.pipeline.set(handler.build_pipeline(settings, s3, dynamodb))
        stack = Stack(outputs, s3, sqs, dynamodb)
        # Configuring the notification made S3 send its s3:TestEvent; each test starts from an empty queue.
        assert [json.loads(r["body"]).get("Event") for r in stack.receive()] == ["s3:TestEvent"]
        yield stack
        handler.pipeline.set(None)


def rewire(
    stack: Stack, s3: Any = None, dynamodb: Any = None, isolation: IsolationLimits | None = None, **env: str
) -> None:
    """Point the handler at (possibly faulty) clients."""
    settings = Settings.from_environment(
        {
            "RESULTS_TABLE": stack.outputs.results_table,
            "INPUT_BUCKET": stack.outputs.input_bucket,
            "INPUT_PREFIX": stack.outputs.input_prefix,
            "MODEL_BUCKET": stack.outputs.model_bucket,
            "MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
            "HEATMAP_BUCKET": stack.outputs.heatmap_bucket,
            **env,
        }
    )
    handler.pipeline.set(handler.build_pipeline(settings, s3 or stack.s3, dynamodb or stack.dynamodb, isolation))


def test_upload_is_scored_into_the_results_table(stack: Stack, sample_paths: list[Path]) -> None:
    """An upload under incoming/ reaches the table as one SCORED item with every documented attribute."""
    stack.upload("incoming/patient-1/film.jpeg", sample_paths[-1].read_bytes())
    records = stack.receive()
    assert len(records) == 1
    assert invoke(records) == {"batchItemFailures": []}
    [item] = stack.results()
    assert item["status"] == "SCORED"
    assert item["image_key"] == f"s3://{stack.outputs.input_bucket}/incoming/patient-1/film.jpeg"
    assert item["label"] in {"NORMAL", "INDETERMINATE", "PNEUMONIA"}
    assert item["confidence"] >= 0.5
    assert item["schema_version"] == 2
    assert item["model_version"] == read_card(RELEASE_MODEL)["version"]
    for attribute in (
        "confidence",
        "pneumonia_probability",
        "normal_below",
        "pneumonia_from",
        "object_etag",
        "object_size",
        "scored_at",
        "latency_ms",
    ):
        assert attribute in item, attribute
    assert item["scored_at"].endswith("Z")


def test_uploads_outside_the_prefix_are_not_notified(stack: Stack, sample_paths: list[Path]) -> None:
    """Only incoming/ is scored: the notification filter comes from the template."""
    stack.upload("elsewhere/film.jpeg", sample_paths[0].read_bytes())
    assert stack.receive() == []


@pytest.mark.parametrize("key", ["incoming/with space.jpeg", "incoming/a+b.jpeg", "incoming/Ünïcødé 肺.jpeg"])
def test_awkward_keys_are_decoded(stack: Stack, sample_paths: list[Path], key: str) -> None:
    """Spaces, plus signs and non-ASCII characters in keys reach the right object."""
    stack.upload(key, sample_paths[0].read_bytes())
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    latest = stack.latest(key)
    assert latest is not None
    assert latest["status"] == "SCORED"


def test_encoded_key_in_notification_is_unquoted(stack: Stack, sample_paths: list[Path]) -> None:
    """S3 sends keys URL-encoded with '+' for spaces; the handler decodes them with unquote_plus."""
    key = "incoming/chest film+1 é.jpeg"
    stack.upload(key, sample_paths[0].read_bytes())
    stack.receive()  # Moto's own notification is replaced by S3's encoded form below.
    head = stack.s3.head_object(Bucket=stack.outputs.input_bucket, Key=key)
    body = load_event("s3_object_created.json")
    item = body["Records"][0]["s3"]
    item["bucket"]["name"] = stack.outputs.input_bucket
    item["object"].update(
        key="incoming/chest+film%2B1+%C3%A9.jpeg",
        size=head["ContentLength"],
        eTag=head["ETag"].strip('"'),
        versionId=head["VersionId"],
    )
    assert invoke([sqs_record("encoded", json.dumps(body))]) == {"batchItemFailures": []}
    assert stack.latest(key) is not None


def test_duplicate_notifications_leave_one_result(stack: Stack, sample_paths: list[Path]) -> None:
    """The same notification delivered as two messages, in one batch and again later, writes one item."""
    stack.upload("incoming/dup.jpeg", sample_paths[0].read_bytes())
    [record] = stack.receive()
    twin = sqs_record("another-message-id", record["body"])
    assert invoke([record, twin]) == {"batchItemFailures": []}
    first = stack.results()
    assert invoke([sqs_record("third-message-id", record["body"])]) == {"batchItemFailures": []}
    assert stack.results() == first
    assert len(first) == 1


def with_version_id(record: dict[str, Any], version_id: str, sequencer: str) -> dict[str, Any]:
    """The record as real S3 sends it for a versioned bucket: with versionId and sequencer (moto omits both)."""
    body = json.loads(record["body"])
    body["Records"][0]["s3"]["object"].update(versionId=version_id, sequencer=sequencer)
    return sqs_record(record["messageId"], json.dumps(body))


def test_older_version_never_replaces_the_newer_result(stack: Stack, sample_paths: list[Path]) -> None:
    """Two uploads of one key processed newest first: both versions are scored, the latest stays the newer."""
    first = stack.s3.put_object(
        Bucket=stack.outputs.input_bucket, Key="incoming/same.jpeg", Body=sample_paths[0].read_bytes()
    )
    [older] = [with_version_id(record, first["VersionId"], "0055AED6DCD90281E5") for record in stack.receive()]
    second = stack.s3.put_object(
        Bucket=stack.outputs.input_bucket, Key="incoming/same.jpeg", Body=sample_paths[-1].read_bytes()
    )
    [newer] = [with_version_id(record, second["VersionId"], "0055AED6DCD90281E6") for record in stack.receive()]
    assert invoke([newer]) == {"batchItemFailures": []}
    assert invoke([older]) == {"batchItemFailures": []}
    latest = stack.latest("incoming/same.jpeg")
    assert latest is not None
    assert latest["object_version_id"] == second["VersionId"]
    assert len(stack.results()) == 2


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_bad_inputs_are_rejected_and_acknowledged(stack: Stack, name: str) -> None:
    """Each permanent input fault gives a REJECTED item with its reason, and the message is not retried."""
    key = f"incoming/hostile/{name}"
    stack.upload(key, HOSTILE[name].body)
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    latest = stack.latest(key)
    assert latest is not None
    assert (latest["status"], latest["reason"]) == ("REJECTED", HOSTILE[name].expected_reason)


def test_unusual_valid_xrays_are_scored_in_one_batch(stack: Stack) -> None:
    """16-bit, CMYK, palette, RGBA, progressive, EXIF-rotated, full-size, DICOM files and odd keys are all scored."""
    for name, item in VALID.items():
        stack.upload(f"incoming/valid/{name}", item.body)
    records = stack.receive()
    assert len(records) == len(VALID)
    assert invoke(records) == {"batchItemFailures": []}
    for name in VALID:
        latest = stack.latest(f"incoming/valid/{name}")
        assert latest is not None, name
        assert latest["status"] == "SCORED", (name, latest.get("reason_detail"))


@pytest.mark.parametrize("retried", ["every record", "one film"])
def test_retried_batch_is_decoded_record_by_record_in_isolation(
    stack: Stack, sample_paths: list[Path], monkeypatch: pytest.MonkeyPatch, retried: str
) -> None:
    """A batch holding records delivered a second time (their batch failed or its process was killed) is decoded
    one by one in child processes, its first deliveries too (a duplicate notification of a bomb beside one retried
    film): the file whose decoding exceeds the child's memory is rejected as a decompression bomb with a fixed
    detail, and the other films of the batch are scored."""
    rewire(stack, isolation=IsolationLimits(memory_bytes=40 * 2**20))
    films = {f"incoming/batch/{path.name}": path.read_bytes() for path in sample_paths[:9]}
    bomb, bomb_body = "incoming/batch/hog.png", decode_cost_bombs()["palette-5000.png"]
    decode = isolated_decode.decode

    def hogging_decode(data: bytes, size: int) -> Any:
        # Decoding this one file allocates far past the child's 40 MB, as a file no budget foresaw would: a fixed
        # overrun, so the outcome never depends on how much freed heap the child inherited.
        if data == bomb_body:
            np.ones(512 * 2**20, dtype=np.uint8)
        return decode(data, size)

    monkeypatch.setattr(isolated_decode, "decode", hogging_decode)
    for key, body in {**films, bomb: bomb_body}.items():
        stack.upload(key, body)
    records = stack.receive()
    assert len(records) == 10
    film_records = [record for record in records if "hog.png" not in record["body"]]
    for record in records if retried == "every record" else film_records[:1]:
        record["attributes"]["ApproximateReceiveCount"] = "2"
    assert invoke(records) == {"batchItemFailures": []}
    rejected = stack.latest(bomb)
    assert rejected is not None
    assert (rejected["status"], rejected["reason"]) == ("REJECTED", "DECOMPRESSION_BOMB")
    assert rejected["reason_detail"] == OVER_BUDGET_DETAIL
    for key in films:
        latest = stack.latest(key)
        assert latest is not None
        assert latest["status"] == "SCORED", key


def test_first_delivery_batch_holding_a_codestream_bomb_costs_the_others_no_redelivery(
    stack: Stack, sample_paths: list[Path]
) -> None:
    """Ten first deliveries, one a DICOM whose 3 KB JPEG-LS frame declares 20,000 x 20,000 pixels inside a data set
    stating 512 x 512 (2 GB when it was decoded), run in the Lambda memory-kill harness at the template's memory
    size and timeout: the invocation is not killed and fails no record, the bomb is DECOMPRESSION_BOMB and the
    nine films are scored, so none of them waits for a redelivery."""
    films = {f"incoming/batch/{path.name}": path.read_bytes() for path in sample_paths[:9]}
    bomb = "incoming/batch/codestream.dcm"
    for key, body in {**films, bomb: codestream_larger_than_header("JPEG-LS", 20_000)}.items():
        stack.upload(key, body)
    records = stack.receive()
    assert len(records) == 10
    assert {record["attributes"]["ApproximateReceiveCount"] for record in records} == {"1"}

    def scored_batch(event: dict[str, Any], context: Any) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
        # The results live in this child's moto; they travel back with the response.
        response = invoke(event["Records"])
        latest = {key: stack.latest(key) or {} for key in [*films, bomb]}
        return response, {key: (item.get("status", ""), item.get("reason", "")) for key, item in latest.items()}

    process = LambdaProcess(scored_batch, LambdaLimits.from_template(load_template()))
    response, outcomes = process({"Records": records}, None)
    assert (process.killed.memory, process.killed.timeout, process.killed.died) == (0, 0, 0)
    assert response == {"batchItemFailures": []}
    assert outcomes.pop(bomb) == ("REJECTED", "DECOMPRESSION_BOMB")
    assert all(status == "SCORED" for status, _ in outcomes.values()), outcomes


def stall_isolated_decodes_of(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the isolated decode of ``body`` outlive any time limit, as a decode starved of CPU would."""
    decode = isolated_decode.decode

    def stalling_decode(data: bytes, size: int) -> Any:
        if data == body:
            signal.pause()
        return decode(data, size)

    monkeypatch.setattr(isolated_decode, "decode", stalling_decode)


@pytest.mark.parametrize(("delivery", "rejected"), [("2", False), ("3", False), ("4", True)])
def test_decode_past_its_time_is_retried_then_rejected_as_a_timeout(
    stack: Stack, sample_paths: list[Path], monkeypatch: pytest.MonkeyPatch, delivery: str, rejected: bool
) -> None:
    """An isolated decode that runs past its time fails only its own record, so SQS delivers it again (a slow
    decode on a busy machine is no verdict), until the delivery DECODE_TIMEOUT_VERDICT_RECEIVE: then it is
    REJECTED as DECODE_TIMEOUT, never DECOMPRESSION_BOMB. The film beside it is scored either way."""
    assert pipeline_module.DECODE_TIMEOUT_VERDICT_RECEIVE == 4
    rewire(stack, isolation=IsolationLimits(seconds=0.5))
    slow_body = sample_paths[1].read_bytes()
    stall_isolated_decodes_of(slow_body, monkeypatch)
    stack.upload("incoming/slow.jpeg", slow_body)
    stack.upload("incoming/film.jpeg", sample_paths[0].read_bytes())
    records = stack.receive()
    for record in records:
        record["attributes"]["ApproximateReceiveCount"] = delivery
    slow_record = next(record for record in records if "slow.jpeg" in record["body"])
    response = invoke(records)
    latest = stack.latest("incoming/slow.jpeg")
    if rejected:
        assert response == {"batchItemFailures": []}
        assert latest is not None
        assert (latest["status"], latest["reason"], latest["reason_detail"]) == (
            "REJECTED",
            "DECODE_TIMEOUT",
            TIMEOUT_DETAIL,
        )
    else:
        assert response == {"batchItemFailures": [{"itemIdentifier": slow_record["messageId"]}]}
        assert latest is None
    film = stack.latest("incoming/film.jpeg")
    assert film is not None
    assert film["status"] == "SCORED"


def test_isolated_decodes_never_outlast_the_invocation(
    stack: Stack, sample_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a retried batch's last allowed delivery, a decode cut short by the invocation's own deadline is retried,
    never DECODE_TIMEOUT: each decode gets at most the invocation's remaining time less a reserve, and a record left
    no time at all fails for retry without decoding."""
    rewire(stack, isolation=IsolationLimits(seconds=30.0))
    slow_body = sample_paths[1].read_bytes()
    stall_isolated_decodes_of(slow_body, monkeypatch)
    stack.upload("incoming/slow.jpeg", slow_body)
    stack.upload("incoming/late.jpeg", sample_paths[0].read_bytes())
    records = stack.receive()
    for record in records:
        record["attributes"]["ApproximateReceiveCount"] = str(pipeline_module.DECODE_TIMEOUT_VERDICT_RECEIVE)
    # The slow film gets 1.5 s of the 11.5 s left (the reserve keeps 10 s); the film after it finds no time left.
    slow_first = sorted(records, key=lambda record: "late.jpeg" in record["body"])
    context = LocalContext(aws_request_id="deadline", timeout_seconds=pipeline_module.INVOCATION_RESERVE_SECONDS + 1.5)
    response = handler.lambda_handler({"Records": slow_first}, context)
    failed = {failure["itemIdentifier"] for failure in response["batchItemFailures"]}
    assert failed == {record["messageId"] for record in records}
    assert stack.latest("incoming/slow.jpeg") is None
    assert stack.latest("incoming/late.jpeg") is None


def test_first_delivery_is_decoded_in_process(
    stack: Stack, sample_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record on its first delivery takes the fast path: decoded in the function's own process, no child."""

    def no_child(data: bytes, size: int, limits: IsolationLimits | None = None) -> None:
        raise AssertionError("a first delivery was decoded in a child process")

    monkeypatch.setattr(pipeline_module, "decode_isolated", no_child)
    stack.upload("incoming/first.jpeg", sample_paths[0].read_bytes())
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    latest = stack.latest("incoming/first.jpeg")
    assert latest is not None
    assert latest["status"] == "SCORED"


def test_s3_test_event_is_acknowledged(stack: Stack) -> None:
    """S3's s3:TestEvent message is consumed and writes nothing."""
    assert invoke([sqs_record("test-event", json.dumps(load_event("s3_test_event.json")))]) == {"batchItemFailures": []}
    assert stack.results() == []


def test_malformed_message_is_retried_not_dropped(stack: Stack) -> None:
    """A body that is not an S3 notification fails its record, so it ends in the DLQ rather than vanishing."""
    response = invoke([sqs_record("garbage", "{not json")])
    assert response == {"batchItemFailures": [{"itemIdentifier": "garbage"}]}


def notification_of(stack: Stack, bucket: str, key: str) -> dict[str, Any]:
    """The S3 notification record AWS would send for ``key`` in ``bucket`` (which need not exist)."""
    record: dict[str, Any] = copy.deepcopy(load_event("s3_object_created.json")["Records"][0])
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"].update(key=key, size=1000, eTag="0123456789abcdef0123456789abcdef")
    record["s3"]["object"].pop("versionId", None)
    return record


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
def test_archived_object_is_rejected_not_retried(stack: Stack, sample_paths: list[Path], storage_class: str) -> None:
    """An object in an archive storage class cannot be read until restored: REJECTED as OBJECT_ARCHIVED at once."""
    key = f"incoming/archived-{storage_class}.jpeg"
    stack.s3.put_object(
        Bucket=stack.outputs.input_bucket, Key=key, Body=sample_paths[0].read_bytes(), StorageClass=storage_class
    )
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    latest = stack.latest(key)
    assert latest is not None
    assert (latest["status"], latest["reason"]) == ("REJECTED", "OBJECT_ARCHIVED")


def test_vanished_bucket_is_rejected_not_retried(stack: Stack) -> None:
    """A notification whose bucket no longer exists gets a REJECTED OBJECT_NOT_FOUND item, not five receives."""
    gone = "pneumoscan-input-deleted-bucket"
    rewire(stack, INPUT_BUCKET=gone)
    body = json.dumps({"Records": [notification_of(stack, gone, "incoming/film.jpeg")]})
    assert invoke([sqs_record("gone", body)]) == {"batchItemFailures": []}
    [item] = stack.results()
    assert (item["status"], item["reason"], item["image_key"]) == (
        "REJECTED",
        "OBJECT_NOT_FOUND",
        f"s3://{gone}/incoming/film.jpeg",
    )


def test_records_outside_the_input_bucket_are_dropped_unread(
    stack: Stack, sample_paths: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A record naming another bucket (even the model bucket, whose objects exist) or a key outside the input
    prefix is acknowledged with a log line and a metric: nothing is read and no item is written."""
    stack.upload("elsewhere/film.jpeg", sample_paths[0].read_bytes())  # Exists, but outside the prefix.
    records = [
        notification_of(stack, stack.outputs.model_bucket, "models/current.json"),
        notification_of(stack, stack.outputs.input_bucket, "elsewhere/film.jpeg"),
    ]
    caplog.set_level(logging.INFO, logger="pneumoscan-scoring")
    forbidden = {name: (1.0, "AccessDenied") for name in ("head_object", "get_object")}
    rewire(stack, s3=FaultInjectingClient(stack.s3, forbidden, random.Random(0)))
    assert invoke([sqs_record("foreign", json.dumps({"Records": records}))]) == {"batchItemFailures": []}
    assert stack.results() == []
    dropped = [r for r in caplog.records if r.getMessage().startswith("record dropped")]
    assert len(dropped) == 2


def test_one_malformed_record_costs_only_itself(stack: Stack, sample_paths: list[Path]) -> None:
    """A message with a malformed record among valid ones scores the valid ones and is not retried."""
    stack.upload("incoming/one.jpeg", sample_paths[0].read_bytes())
    stack.upload("incoming/two.jpeg", sample_paths[-1].read_bytes())
    valid = [json.loads(record["body"])["Records"][0] for record in stack.receive()]
    broken = notification_of(stack, stack.outputs.input_bucket, "incoming/broken.jpeg")
    del broken["s3"]["object"]["key"]
    body = json.dumps({"Records": [valid[0], broken, valid[1]]})
    assert invoke([sqs_record("mixed", body)]) == {"batchItemFailures": []}
    assert sorted(item["image_key"].rsplit("/", 1)[-1] for item in stack.results()) == ["one.jpeg", "two.jpeg"]


@pytest.mark.parametrize("operation", ["get_object", "head_object"])
def test_s3_faults_fail_only_their_records(stack: Stack, sample_paths: list[Path], operation: str) -> None:
    """A throttled S3 read fails that record for retry; after recovery the retry scores it."""
    stack.upload("incoming/retry.jpeg", sample_paths[0].read_bytes())
    records = stack.receive()
    failing_s3 = faulty(stack.s3, operation, "SlowDown")
    rewire(stack, s3=failing_s3)
    # The model loads through the faulty client's other operations, which still work.
    assert invoke(records) == {"batchItemFailures": [{"itemIdentifier": records[0]["messageId"]}]}
    assert stack.results() == []
    rewire(stack)  # S3 recovers.
    assert invoke(records) == {"batchItemFailures": []}
    assert len(stack.results()) == 1


class MeetingClient:
    """A client whose ``operation`` calls each wait until ``parties`` of them are in flight at once: calls made one
    after another never meet, and the first one fails once the barrier's timeout passes."""

    def __init__(self, client: Any, operation: str, parties: int) -> None:
        self._client = client
        self._operation = operation
        self._barrier = threading.Barrier(parties, timeout=60)
        self.met = 0

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._client, name)
        if name != self._operation:
            return call

        def meet(**arguments: Any) -> Any:
            self._barrier.wait()
            self.met += 1
            return call(**arguments)

        return meet


def test_a_batchs_reads_and_writes_are_in_flight_together(stack: Stack, sample_paths: list[Path]) -> None:
    """The HEADs of a batch's three films, and then their three result writes, are all in flight at once; the
    films are scored and written once each."""
    for index in range(3):
        stack.upload(f"incoming/together/{index}.jpeg", sample_paths[index].read_bytes())
    records = stack.receive()
    heads = MeetingClient(stack.s3, "head_object", parties=3)
    writes = MeetingClient(stack.dynamodb, "put_item", parties=3)
    rewire(stack, s3=heads, dynamodb=writes)
    assert invoke(records) == {"batchItemFailures": []}
    assert (heads.met, writes.met) == (3, 3)
    assert len(stack.results()) == 3


def test_io_concurrency_one_reads_one_after_another(stack: Stack, sample_paths: list[Path]) -> None:
    """With IO_CONCURRENCY=1 every call waits for the one before: a client that counts calls in flight never sees
    two, and the batch is scored as with the default."""
    for index in range(3):
        stack.upload(f"incoming/in-turn/{index}.jpeg", sample_paths[index].read_bytes())
    records = stack.receive()
    counter = InFlightCounter(stack.s3)
    rewire(stack, s3=counter, IO_CONCURRENCY="1")
    assert invoke(records) == {"batchItemFailures": []}
    # The model's files, then HEAD and GET of each film and the flagged films' heatmaps: never two at once.
    assert counter.most == 1
    assert counter.calls >= 6
    assert len(stack.results()) == 3


def test_a_batch_larger_than_the_read_budget_is_read_a_wave_at_a_time(
    stack: Stack, sample_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a batch's films add up to more than READ_WAVE_BYTES their downloads run in waves within it, each wave
    decoded before the next is read: with a budget smaller than one film, each film is downloaded only after the
    one before it was decoded (their HEADs still run at once), and every film is scored."""
    for index in range(3):
        stack.upload(f"incoming/waves/{index}.jpeg", sample_paths[index].read_bytes())
    records = stack.receive()
    steps: list[str] = []
    downloads = StepRecorder(stack.s3, steps)
    decode = pipeline_module.decode

    def recorded_decode(data: bytes, size: int) -> Any:
        steps.append("decode")
        return decode(data, size)

    monkeypatch.setattr(pipeline_module, "decode", recorded_decode)
    monkeypatch.setattr(pipeline_module, "READ_WAVE_BYTES", 1)
    heads = MeetingClient(downloads, "head_object", parties=3)
    rewire(stack, s3=heads)
    assert invoke(records) == {"batchItemFailures": []}
    assert steps == ["download", "decode"] * 3
    assert heads.met == 3
    assert len(stack.results()) == 3


class StepRecorder:
    """A client that appends "download" to ``steps`` for every GET of an uploaded film (not the model's files)."""

    def __init__(self, client: Any, steps: list[str]) -> None:
        self._client = client
        self._steps = steps

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._client, name)
        if name != "get_object":
            return call

        def recorded(**arguments: Any) -> Any:
            if arguments["Key"].startswith("incoming/"):
                self._steps.append("download")
            return call(**arguments)

        return recorded


class InFlightCounter:
    """A client that counts its HEAD, GET and PUT calls and the most of them in flight at once."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._now = 0
        self.calls = 0
        self.most = 0

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._client, name)
        if name not in {"head_object", "get_object", "put_object"}:
            return call

        def counted(**arguments: Any) -> Any:
            with self._lock:
                self._now += 1
                self.calls += 1
                self.most = max(self.most, self._now)
            try:
                return call(**arguments)
            finally:
                with self._lock:
                    self._now -= 1

        return counted


def test_throttled_write_is_retried_and_lands_once(stack: Stack, sample_paths: list[Path]) -> None:
    """A throttled DynamoDB write fails the record; the retry writes exactly one item."""
    stack.upload("incoming/throttle.jpeg", sample_paths[0].read_bytes())
    stack.upload("incoming/fine.jpeg", sample_paths[-1].read_bytes())
    records = stack.receive()
    throttled = faulty(stack.dynamodb, "put_item", "ProvisionedThroughputExceededException")
    rewire(stack, dynamodb=throttled)
    failures = invoke(records)["batchItemFailures"]
    assert sorted(f["itemIdentifier"] for f in failures) == sorted(r["messageId"] for r in records)
    rewire(stack)  # DynamoDB recovers.
    assert invoke(records) == {"batchItemFailures": []}
    assert len(stack.results()) == 2


def test_missing_model_fails_the_batch_for_retry(stack: Stack, sample_paths: list[Path]) -> None:
    """With no promoted model, records are reported failed (retried, then DLQ), never dropped."""
    stack.s3.delete_object(Bucket=stack.outputs.model_bucket, Key="models/current.json")
    rewire(stack)
    stack.upload("incoming/no-model.jpeg", sample_paths[0].read_bytes())
    records = stack.receive()
    assert invoke(records) == {"batchItemFailures": [{"itemIdentifier": records[0]["messageId"]}]}
    assert stack.results() == []


def test_handler_never_writes_to_the_input_bucket(stack: Stack, sample_paths: list[Path]) -> None:
    """Scoring works with every S3 write operation on the input bucket forbidden (a flagged film's heatmap goes to
    the heatmap bucket)."""
    forbidden = {name: (1.0, "AccessDenied") for name in ("put_object", "delete_object", "copy_object", "upload_file")}

    def elsewhere(arguments: dict[str, Any]) -> bool:
        return arguments.get("Bucket") != stack.outputs.input_bucket

    rewire(stack, s3=FaultInjectingClient(stack.s3, forbidden, random.Random(0), spare=elsewhere))
    stack.upload("incoming/readonly.jpeg", sample_paths[0].read_bytes())
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    assert stack.results()[0]["status"] == "SCORED"


def test_logs_carry_no_image_content(stack: Stack, sample_paths: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    """Every log line is structured JSON with keys and verdicts; no image bytes, in any encoding, reach the logs."""
    body = sample_paths[0].read_bytes()
    stack.upload("incoming/logged.jpeg", body)
    stack.upload("incoming/hostile/notes.jpeg", HOSTILE["notes.jpeg"].body)
    caplog.set_level(logging.INFO, logger="pneumoscan-scoring")
    invoke(stack.receive())
    # Each record as the function's JSON formatter writes it to CloudWatch.
    formatter = handler.logger.registered_formatter
    output = "\n".join(formatter.format(record) for record in caplog.records if record.name == "pneumoscan-scoring")
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    logged = [line for line in lines if "message" in line]
    assert {line["message"] for line in logged} >= {"image scored", "image rejected"}
    assert all(line.get("correlation_id") for line in logged)
    text = output.lower()
    for payload in (body, HOSTILE["notes.jpeg"].body):
        assert base64.b64encode(payload[:48]).decode().lower() not in text
        assert payload[:8].hex() not in text
    assert "patient notes" not in text


def test_patient_data_in_files_never_leaves_them(
    stack: Stack,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
) -> None:
    """A patient name and record number planted in every DICOM text element (malformed or not), in corrupt files
    and in DICOM files through the decode budgets' paths (too many elements, deflated) appear in no table item,
    result event, log line, metric, warning or output stream."""
    planted = patient_data_files(Image.open(FILM).convert("L"))
    for name, body in planted.items():
        stack.upload(f"incoming/planted/{name}", body)
    caplog.set_level(logging.INFO)  # Every logger at the function's level (boto's DEBUG lines show the uploads).
    for name in ("pneumoscan-scoring", "pydicom", "PIL"):
        caplog.set_level(logging.DEBUG, logger=name)
    records = stack.receive()
    capsys.readouterr()  # Building the files made pydicom warn: only what the function writes counts.
    caplog.clear()
    recwarn.clear()
    assert invoke(records) == {"batchItemFailures": []}
    items = stack.results()
    assert {item["image_key"].rsplit("/", 1)[-1] for item in items} == set(planted)
    assert next(item for item in items if item["image_key"].endswith("/identified.dcm"))["status"] == "SCORED"
    outcomes = {item["image_key"].rsplit("/", 1)[-1]: (item["status"], item.get("reason")) for item in items}
    assert outcomes["identified-too-many-elements.dcm"] == ("REJECTED", "DECOMPRESSION_BOMB")
    assert outcomes["identified-deflated.dcm"] == ("SCORED", None)
    formatter = handler.logger.registered_formatter
    streams = capsys.readouterr()
    written = [
        *(json.dumps(item, default=str) for item in items),
        *(json.dumps(result_detail(item)) for item in items),
        *(formatter.format(record) for record in caplog.records),
        *(str(warning.message) for warning in recwarn),
        streams.out,
        streams.err,
    ]
    text = "\n".join(written).lower()
    for marker in PATIENT_MARKERS:
        assert marker.lower() not in text, marker
    assert "0012345" not in text


def test_metrics_are_emitted_by_model_version(
    stack: Stack, sample_paths: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Scored and rejected images produce EMF metrics with the serving model's version as a dimension."""
    stack.upload("incoming/metric.jpeg", sample_paths[0].read_bytes())
    stack.upload("incoming/hostile/zero.jpeg", b"")
    capsys.readouterr()
    invoke(stack.receive())
    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    [main_flush] = [d for d in documents if "ImagesScored" in d]
    assert main_flush["model_version"] == read_card(RELEASE_MODEL)["version"]
    assert main_flush["ImagesScored"] == [1.0]
    assert main_flush["ImagesRejected"] == [1.0]
    # Drift signals: the average of PneumoniaDetected is the share called PNEUMONIA, per model version.
    [item] = [item for item in stack.results() if item["status"] == "SCORED"]
    assert main_flush["PneumoniaDetected"] == [1.0 if item["label"] == "PNEUMONIA" else 0.0]
    assert main_flush["PneumoniaProbability"] == [pytest.approx(float(item["pneumonia_probability"]))]
    [probability] = main_flush["PneumoniaProbability"]
    assert 0.0 <= probability <= 1.0
    assert any(d.get("reason") == "EMPTY_FILE" for d in documents)


def failure_reports(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The failure log lines as the function's JSON formatter writes them, and RecordsFailed per fault class from
    the EMF documents on standard output."""
    formatter = handler.logger.registered_formatter
    lines = [json.loads(formatter.format(record)) for record in caplog.records if record.name == "pneumoscan-scoring"]
    failed = [line for line in lines if str(line.get("message", "")).startswith("record failed")]
    counts: dict[str, float] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith('{"_aws"') and "RecordsFailed" in (document := json.loads(line)):
            value = document["RecordsFailed"]
            counts[document["fault_class"]] = counts.get(document["fault_class"], 0.0) + (
                float(sum(value)) if isinstance(value, list) else float(value)
            )
    return failed, counts


def test_every_failed_record_is_logged_and_counted(
    stack: Stack, sample_paths: list[Path], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of N records reported in batchItemFailures gives one structured log line (message id, fault class, key
    digest, no key and no fault text) and RecordsFailed counts N in the EMF output, by fault class."""
    keys = [f"incoming/fails/{index}.jpeg" for index in range(5)]
    for key in keys:
        stack.upload(key, sample_paths[0].read_bytes())
    records = stack.receive()
    # HEAD fails: the model still loads (its files are read with GET).
    rewire(stack, s3=faulty(stack.s3, "head_object", "SlowDown"))
    caplog.set_level(logging.INFO, logger="pneumoscan-scoring")
    capsys.readouterr()
    failures = invoke(records)["batchItemFailures"]
    assert len(failures) == len(keys) == 5
    lines, counts = failure_reports(caplog, capsys)
    assert counts == {"transient_aws": 5.0}
    assert sorted(line["message_id"] for line in lines) == sorted(r["messageId"] for r in records)
    assert {line["level"] for line in lines} == {"WARNING"}
    assert {line["fault_class"] for line in lines} == {"transient_aws"}
    digests = {hashlib.sha256(f"s3://{stack.outputs.input_bucket}/{key}".encode()).hexdigest()[:16] for key in keys}
    assert {digest for line in lines for digest in line["key_sha256"]} == digests
    text = json.dumps(lines)
    assert "incoming/fails" not in text
    assert "SlowDown" not in text


def test_failures_are_classed_by_fault(
    stack: Stack, sample_paths: list[Path], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed body, a missing model and a throttled write each count under their own fault class; records that
    succeed give no failure line."""
    caplog.set_level(logging.INFO, logger="pneumoscan-scoring")
    capsys.readouterr()
    assert invoke([sqs_record("garbage", "{not json")]) == {"batchItemFailures": [{"itemIdentifier": "garbage"}]}
    stack.upload("incoming/throttled.jpeg", sample_paths[0].read_bytes())
    records = stack.receive()
    rewire(stack, dynamodb=faulty(stack.dynamodb, "put_item", "ProvisionedThroughputExceededException"))
    assert len(invoke(records)["batchItemFailures"]) == 1
    stack.s3.delete_object(Bucket=stack.outputs.model_bucket, Key="models/current.json")
    rewire(stack)
    assert len(invoke(records)["batchItemFailures"]) == 1
    lines, counts = failure_reports(caplog, capsys)
    assert counts == {"malformed_message": 1.0, "transient_aws": 1.0, "model_unavailable": 1.0}
    assert [(line["fault_class"], line["level"]) for line in lines] == [
        ("malformed_message", "ERROR"),
        ("transient_aws", "WARNING"),
        ("model_unavailable", "ERROR"),
    ]
    assert lines[0]["key_sha256"] == []


RELEASE_VERSION = read_card(RELEASE_MODEL)["version"]


def backfill_record(
    stack: Stack, key: str, model_version: str = RELEASE_VERSION, message_id: str = "backfill"
) -> dict[str, Any]:
    """The SQS record of a backfill request for the object now at ``key``, as `pneumoscan backfill` sends it."""
    head = stack.s3.head_object(Bucket=stack.outputs.input_bucket, Key=key)
    request = BackfillRequest(
        bucket=stack.outputs.input_bucket,
        key=key,
        etag=head["ETag"].strip('"'),
        size=head["ContentLength"],
        model_version=model_version,
    )
    return sqs_record(message_id, request.to_json())


def test_backfill_of_a_version_the_model_already_scored_adds_nothing(stack: Stack, sample_paths: list[Path]) -> None:
    """Re-scoring with the model that already scored this object version is skipped: one result stays."""
    stack.upload("incoming/scored.jpeg", sample_paths[0].read_bytes())
    invoke(stack.receive())
    assert invoke([backfill_record(stack, "incoming/scored.jpeg")]) == {"batchItemFailures": []}
    assert len(stack.results()) == 1


def test_backfill_scores_an_object_no_notification_scored(stack: Stack, sample_paths: list[Path]) -> None:
    """An object that predates the stack is scored by a backfill, and a later upload of its key is the latest."""
    stack.upload("incoming/old.jpeg", sample_paths[0].read_bytes())
    stack.receive()  # The stack did not exist yet: nobody scored this upload.
    assert invoke([backfill_record(stack, "incoming/old.jpeg")]) == {"batchItemFailures": []}
    [item] = stack.results()
    assert item["trigger"] == "backfill"
    assert item["object_sequence"].startswith(NEVER_NOTIFIED)
    stack.upload("incoming/old.jpeg", sample_paths[-1].read_bytes())
    invoke(stack.receive())
    latest = stack.latest("incoming/old.jpeg")
    assert latest is not None
    assert latest["trigger"] == "upload"
    assert latest["object_size"] == sample_paths[-1].stat().st_size


def test_backfill_for_a_model_not_served_is_retried(stack: Stack, sample_paths: list[Path]) -> None:
    """A backfill pinned to another model fails its record, so SQS retries it once the function has refreshed."""
    stack.upload("incoming/pinned.jpeg", sample_paths[0].read_bytes())
    stack.receive()
    response = invoke([backfill_record(stack, "incoming/pinned.jpeg", "a-model-not-promoted", "pinned")])
    assert response == {"batchItemFailures": [{"itemIdentifier": "pinned"}]}
    assert stack.results() == []


def test_backfill_of_a_replaced_object_is_skipped(stack: Stack, sample_paths: list[Path]) -> None:
    """When the key was overwritten after the listing, the backfill skips it; the new upload has its own event."""
    stack.upload("incoming/replaced.jpeg", sample_paths[0].read_bytes())
    stack.receive()
    record = backfill_record(stack, "incoming/replaced.jpeg")
    stack.upload("incoming/replaced.jpeg", sample_paths[-1].read_bytes())
    stack.receive()
    assert invoke([record]) == {"batchItemFailures": []}
    assert stack.results() == []


def heatmap_png(stack: Stack, heatmap_key: str) -> Image.Image:
    bucket, key = heatmap_key.removeprefix("s3://").split("/", 1)
    assert bucket == stack.outputs.heatmap_bucket
    return Image.open(io.BytesIO(stack.s3.get_object(Bucket=bucket, Key=key)["Body"].read()), formats=["PNG"])


def test_flagged_verdicts_point_to_a_heatmap(stack: Stack, sample_paths: list[Path]) -> None:
    """Every flagged film (PNEUMONIA or INDETERMINATE) has an overlay PNG in the heatmap bucket; films called NORMAL
    have none."""
    for index, path in enumerate(sample_paths):
        stack.upload(f"incoming/film-{index}.jpeg", path.read_bytes())
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    items = stack.results()
    assert "PNEUMONIA" in {item["label"] for item in items}
    for item in items:
        assert ("heatmap_key" in item) == (item["label"] != "NORMAL")
        if "heatmap_key" in item:
            assert heatmap_png(stack, item["heatmap_key"]).size == (224, 224)


def test_heatmap_on_request_for_any_verdict(stack: Stack, sample_paths: list[Path]) -> None:
    """Object metadata pneumoscan-explain: true asks for a heatmap whatever the verdict."""
    stack.s3.put_object(
        Bucket=stack.outputs.input_bucket,
        Key="incoming/explain-me.jpeg",
        Body=sample_paths[0].read_bytes(),
        Metadata={"pneumoscan-explain": "true"},
    )
    invoke(stack.receive())
    [item] = stack.results()
    assert heatmap_png(stack, item["heatmap_key"]).format == "PNG"


def test_heatmaps_on_request_only(stack: Stack, sample_paths: list[Path]) -> None:
    """With HEATMAPS=OnRequest (the template's default) a flagged film gets no heatmap unless its upload asks for one;
    its verdict is unchanged."""
    rewire(stack, HEATMAPS="OnRequest")
    for index, path in enumerate(sample_paths):
        stack.upload(f"incoming/film-{index}.jpeg", path.read_bytes())
    stack.s3.put_object(
        Bucket=stack.outputs.input_bucket,
        Key="incoming/explain-me.jpeg",
        Body=sample_paths[0].read_bytes(),
        Metadata={"pneumoscan-explain": "true"},
    )
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    items = {item["image_key"].rsplit("/", 1)[-1]: item for item in stack.results()}
    asked = items.pop("explain-me.jpeg")
    assert heatmap_png(stack, asked["heatmap_key"]).format == "PNG"
    assert "PNEUMONIA" in {item["label"] for item in items.values()}
    assert not [item for item in items.values() if "heatmap_key" in item]


def test_an_unknown_heatmap_policy_is_refused() -> None:
    """HEATMAPS other than Flagged or OnRequest is a configuration error; unset it is Flagged."""
    environment = {"RESULTS_TABLE": "t", "INPUT_BUCKET": "b", "MODEL_BUCKET": "m"}
    assert Settings.from_environment(environment).heatmaps_for_flagged
    assert not Settings.from_environment({**environment, "HEATMAPS": "OnRequest"}).heatmaps_for_flagged
    with pytest.raises(ConfigurationError, match="HEATMAPS"):
        Settings.from_environment({**environment, "HEATMAPS": "always"})


INFO_LOG_BYTES_PER_IMAGE = 500
"""The most INFO log a scored film may cost (CloudWatch ingests and bills every byte)."""
CONTEXT_KEYS_LOGGED = {"function_request_id", "correlation_id"}
"""Of Lambda's context, only the request id and the message id reach the log."""


def _logged(records: list[dict[str, Any]]) -> list[str]:
    """Invoke the handler on ``records`` and return every line it writes to its log."""
    stream = io.StringIO()
    log_handler: Any = handler.logger.registered_handler
    previous = log_handler.setStream(stream)
    try:
        with contextlib.redirect_stdout(stream):
            assert invoke(records) == {"batchItemFailures": []}
    finally:
        log_handler.setStream(previous)
    return [line for line in stream.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("batch", [1, 10])
def test_a_scored_film_logs_at_most_500_bytes_at_info(stack: Stack, sample_paths: list[Path], batch: int) -> None:
    """A scored film costs at most 500 bytes of INFO log, one invocation alone or ten together: no code location,
    trace id or function name, ARN and memory (the log group and Lambda's REPORT line say those); the invocation's
    metrics record has no dimension per image."""
    films = [sample_paths[index % len(sample_paths)] for index in range(batch)]
    for index, path in enumerate(films):
        stack.upload(f"incoming/log/{index}.jpeg", path.read_bytes())
    raw = _logged(stack.receive())
    lines = [json.loads(line) for line in raw]
    info = [line for line in lines if line.get("level") == "INFO"]
    scored = [line for line in info if line["message"] == "image scored"]
    assert len(scored) == batch
    info_bytes = sum(
        len(text.encode()) + 1 for text, line in zip(raw, lines, strict=True) if line.get("level") == "INFO"
    )
    assert info_bytes / batch <= INFO_LOG_BYTES_PER_IMAGE, info
    for line in info:
        assert not {"location", "xray_trace_id", "function_arn", "function_name", "cold_start"} & set(line), line
        assert set(line) >= CONTEXT_KEYS_LOGGED
    [metrics_record] = [line for line in lines if "_aws" in line]
    [declaration] = metrics_record["_aws"]["CloudWatchMetrics"]
    assert declaration["Dimensions"] == [["model_version", "service"]]


def test_heatmap_storage_fault_retries_the_record(stack: Stack, sample_paths: list[Path]) -> None:
    """When the heatmap cannot be stored, the record is retried and no result points to a missing heatmap."""
    stack.s3.put_object(
        Bucket=stack.outputs.input_bucket,
        Key="incoming/explain-later.jpeg",
        Body=sample_paths[0].read_bytes(),
        Metadata={"pneumoscan-explain": "true"},
    )
    [record] = stack.receive()
    s3 = faulty(stack.s3, "put_object", "SlowDown")
    rewire(stack, s3=s3)
    assert invoke([record]) == {"batchItemFailures": [{"itemIdentifier": record["messageId"]}]}
    assert stack.results() == []
    rewire(stack)  # S3 recovers.
    assert invoke([record]) == {"batchItemFailures": []}
    [item] = stack.results()
    assert heatmap_png(stack, item["heatmap_key"]).format == "PNG"


def test_model_without_explainer_still_scores(stack: Stack, sample_paths: list[Path], tmp_path: Path) -> None:
    """A model whose card names no explainer scores as before, only without heatmaps."""
    artifact = tmp_path / "no-explainer"
    shutil.copytree(RELEASE_MODEL, artifact)
    (artifact / "explain.tflite").unlink()
    card = read_card(artifact)
    del card["explainer"]
    (artifact / "model_card.json").write_text(json.dumps(card))
    rewire(stack, MODEL_PATH=str(artifact))
    stack.upload("incoming/no-heatmap.jpeg", sample_paths[-1].read_bytes())
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    [item] = stack.results()
    assert item["status"] == "SCORED"
    assert "heatmap_key" not in item


def test_non_radiographs_are_refused_beside_a_film(stack: Stack, sample_paths: list[Path]) -> None:
    """A blank image and a photograph in a film's batch are REJECTED as NOT_A_CHEST_XRAY with no verdict or heatmap;
    the film is scored."""
    blank = io.BytesIO()
    Image.new("L", (512, 512), 255).save(blank, format="PNG")
    photograph = next(item for item in non_radiographs() if item.category == "photograph")
    stack.upload("incoming/odd/blank.png", blank.getvalue())
    stack.upload("incoming/odd/photograph.jpeg", photograph.data)
    stack.upload("incoming/odd/film.jpeg", sample_paths[-1].read_bytes())
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    for name in ("blank.png", "photograph.jpeg"):
        latest = stack.latest(f"incoming/odd/{name}")
        assert latest is not None
        assert (latest["status"], latest["reason"]) == ("REJECTED", "NOT_A_CHEST_XRAY")
        assert "label" not in latest
        assert "heatmap_key" not in latest
    film = stack.latest("incoming/odd/film.jpeg")
    assert film is not None
    assert film["status"] == "SCORED"


DICOM_AGES = {
    "062Y": "REJECTED",
    "045Y": "REJECTED",
    "18": "REJECTED",
    "004Y": "SCORED",
    "030M": "SCORED",
    "010D": "SCORED",
    None: "SCORED",
    "garbage": "SCORED",
}
"""A DICOM's stated PatientAge and its outcome with the release card's population (0 to under 18 years)."""


def _age_key(age: str | None) -> str:
    """The film's key, which never spells its age, so that the age's absence from what is written can be checked."""
    return f"incoming/ages/film-{list(DICOM_AGES).index(age)}.dcm"


@pytest.mark.parametrize("retried", [False, True], ids=["in-process", "isolated"])
def test_dicom_ages_outside_the_validated_population_are_rejected(
    stack: Stack, caplog: pytest.LogCaptureFixture, retried: bool
) -> None:
    """DICOM films stating 62, 45 or 18 (plain) years are REJECTED as OUTSIDE_VALIDATED_POPULATION with a detail
    naming the accepted range; 4 years, 30 months, 10 days, no age and an unreadable age are scored; the same when
    the batch is decoded in child processes. No stated age appears in any item or log line."""
    film = dicom_bytes(Image.open(FILM).convert("L"))
    for age in DICOM_AGES:
        stack.upload(_age_key(age), with_patient_age(film, age))
    records = stack.receive()
    if retried:
        records[0]["attributes"]["ApproximateReceiveCount"] = "2"
    caplog.set_level(logging.DEBUG)
    assert invoke(records) == {"batchItemFailures": []}
    for age, status in DICOM_AGES.items():
        latest = stack.latest(_age_key(age))
        assert latest is not None
        assert latest["status"] == status, age
        if status == "REJECTED":
            assert latest["reason"] == "OUTSIDE_VALIDATED_POPULATION"
            assert latest["reason_detail"] == outside_detail(AgeRange(0, 18))
    formatter = handler.logger.registered_formatter
    written = "\n".join(
        [*(json.dumps(item, default=str) for item in stack.results())]
        + [formatter.format(record) for record in caplog.records if record.name == "pneumoscan-scoring"]
    )
    assert "OUTSIDE_VALIDATED_POPULATION" in written
    for stated in ("062Y", "045Y", "030M", "010D", "garbage"):
        assert stated not in written, stated


def test_patient_age_metadata_outside_the_range_is_rejected_unread(stack: Stack, sample_paths: list[Path]) -> None:
    """Object metadata patient-age 62 rejects the upload as OUTSIDE_VALIDATED_POPULATION from the HEAD alone (no
    GET of it is made); patient-age 4 is scored."""
    input_bucket = stack.outputs.input_bucket
    downloads = FaultInjectingClient(
        stack.s3,
        {"get_object": (1.0, "AccessDenied")},
        random.Random(0),
        spare=lambda arguments: arguments.get("Bucket") != input_bucket,  # The model still loads.
    )
    rewire(stack, s3=downloads)
    for age in ("62", "4"):
        stack.s3.put_object(
            Bucket=input_bucket,
            Key=f"incoming/metadata/{age}.jpeg",
            Body=sample_paths[0].read_bytes(),
            Metadata={"patient-age": age},
        )
    records = stack.receive()
    adult = next(record for record in records if "%2F62.jpeg" in record["body"])
    child = next(record for record in records if "%2F4.jpeg" in record["body"])
    assert invoke([adult]) == {"batchItemFailures": []}
    assert downloads.injected["get_object"] == 0
    rejected = stack.latest("incoming/metadata/62.jpeg")
    assert rejected is not None
    assert (rejected["status"], rejected["reason"]) == ("REJECTED", "OUTSIDE_VALIDATED_POPULATION")
    rewire(stack)
    assert invoke([child]) == {"batchItemFailures": []}
    scored = stack.latest("incoming/metadata/4.jpeg")
    assert scored is not None
    assert scored["status"] == "SCORED"


def test_deployment_age_bounds_replace_the_cards(stack: Stack, sample_paths: list[Path]) -> None:
    """MAX_PATIENT_AGE_YEARS (the template's MaxPatientAgeYears) replaces the card's bound: at 3, a DICOM stating 4
    years and metadata stating 4 are rejected naming 0 to under 3 years, 30 months is scored."""
    rewire(stack, MAX_PATIENT_AGE_YEARS="3")
    film = dicom_bytes(Image.open(FILM).convert("L"))
    stack.upload("incoming/bounds/004Y.dcm", with_patient_age(film, "004Y"))
    stack.upload("incoming/bounds/030M.dcm", with_patient_age(film, "030M"))
    stack.s3.put_object(
        Bucket=stack.outputs.input_bucket,
        Key="incoming/bounds/4.jpeg",
        Body=sample_paths[0].read_bytes(),
        Metadata={"patient-age": "4"},
    )
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    outcomes = {item["image_key"].rsplit("/", 1)[-1]: item for item in stack.results()}
    for name in ("004Y.dcm", "4.jpeg"):
        assert outcomes[name]["reason"] == "OUTSIDE_VALIDATED_POPULATION", name
        assert outcomes[name]["reason_detail"] == outside_detail(AgeRange(0, 3))
    assert outcomes["030M.dcm"]["status"] == "SCORED"


def test_unreadable_films_are_refused_beside_a_film(
    stack: Stack, sample_xray: Image.Image, sample_paths: list[Path], screened_release: Path
) -> None:
    """With a model whose artifact has the film-condition head, an inverted film and the top-left quarter of a film
    are REJECTED with their reasons and fixed details, no verdict and no heatmap; the film beside them is scored."""
    rewire(stack, MODEL_PATH=str(screened_release))
    quarter = sample_xray.crop((0, 0, sample_xray.width // 2, sample_xray.height // 2)).resize(sample_xray.size)
    uploads = {"inverted.png": ImageOps.invert(sample_xray), "quarter.png": quarter}
    for name, image in uploads.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        stack.upload(f"incoming/unreadable/{name}", buffer.getvalue())
    stack.upload("incoming/unreadable/film.jpeg", sample_paths[-1].read_bytes())
    assert invoke(stack.receive()) == {"batchItemFailures": []}
    expected = {
        "inverted.png": ("INVERTED_IMAGE", screening.INVERTED),
        "quarter.png": ("NON_DIAGNOSTIC_IMAGE", screening.PARTIAL),
    }
    for name, (reason, detail) in expected.items():
        latest = stack.latest(f"incoming/unreadable/{name}")
        assert latest is not None
        assert (latest["status"], latest["reason"], latest["reason_detail"]) == ("REJECTED", reason, detail)
        assert "label" not in latest
        assert "heatmap_key" not in latest
    film = stack.latest("incoming/unreadable/film.jpeg")
    assert film is not None
    assert film["status"] == "SCORED"
