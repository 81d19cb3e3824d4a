"""Backfill by S3 Batch Operations: one task per object, answered so that Batch Operations retries or reports it."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from moto import mock_aws

from batch_backfill import handler as batch_backfill
from batch_backfill.handler import BackfillEnqueuer, BatchBackfillSettings
from core.events import parse_message_body
from infra.fault_injection import FaultInjectingClient
from infra.local_stack import LocalContext
from infra.resources import create_data_plane

EVENT = json.loads((Path(__file__).parent / "events" / "s3_batch_operation.json").read_text())
REGION = "us-east-1"


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any, Any]]:
    """The template's buckets and queues on moto, and the handler wired to them."""
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
    with mock_aws():
        clients = [boto3.client(name, region_name=REGION) for name in ("s3", "sqs", "dynamodb", "events")]
        outputs = create_data_plane(*clients, region=REGION)
        s3, sqs = clients[0], clients[1]
        settings = BatchBackfillSettings(outputs.queue_url, outputs.input_bucket, outputs.input_prefix)
        batch_backfill.enqueuer.set(BackfillEnqueuer(s3, sqs, settings))
        yield s3, sqs, outputs
        batch_backfill.enqueuer.set(None)


def invoke(bucket: str, key: str, model_version: str = "model-a") -> dict[str, Any]:
    """Call the handler with the fixture event for one object, its key URL-encoded as S3 sends it."""
    event = copy.deepcopy(EVENT)
    event["job"]["userArguments"]["model_version"] = model_version
    event["tasks"][0].update(s3Bucket=bucket, s3Key=quote_plus(key))
    [result] = batch_backfill.lambda_handler(event, LocalContext())["results"]
    return dict(result)


def queued(sqs: Any, queue_url: str) -> list[str]:
    """The backfill requests on the scoring queue (the uploads' own notifications are there too)."""
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
    return [message["Body"] for message in messages if '"source":"pneumoscan.backfill"' in message["Body"]]


def test_task_enqueues_the_same_request_as_the_cli(stack: tuple[Any, Any, Any]) -> None:
    """An object under the input prefix becomes one backfill request with its ETag, size and the job's model."""
    s3, sqs, outputs = stack
    key = "incoming/old film é+1.jpeg"
    s3.put_object(Bucket=outputs.input_bucket, Key=key, Body=b"x" * 42)
    result = invoke(outputs.input_bucket, key)
    assert result["resultCode"] == "Succeeded"
    [body] = queued(sqs, outputs.queue_url)
    [ref] = parse_message_body(body)
    head = s3.head_object(Bucket=outputs.input_bucket, Key=key)
    assert (ref.key, ref.size, ref.etag, ref.backfill_model) == (key, 42, head["ETag"].strip('"'), "model-a")


@pytest.mark.parametrize(
    ("key", "model_version", "why"),
    [
        ("incoming/gone.jpeg", "model-a", "no longer exists"),
        ("elsewhere/film.jpeg", "model-a", "outside"),
        ("incoming/film.jpeg", "", "model_version is required"),
    ],
)
def test_tasks_that_can_never_succeed_are_reported(
    stack: tuple[Any, Any, Any], key: str, model_version: str, why: str
) -> None:
    """A missing object, one outside the prefix, or a job without a model fails for good, with the reason."""
    s3, sqs, outputs = stack
    s3.put_object(Bucket=outputs.input_bucket, Key="incoming/film.jpeg", Body=b"x")
    s3.put_object(Bucket=outputs.input_bucket, Key="elsewhere/film.jpeg", Body=b"x")
    result = invoke(outputs.input_bucket, key, model_version)
    assert result["resultCode"] == "PermanentFailure"
    assert why in result["resultString"]
    assert queued(sqs, outputs.queue_url) == []


def test_a_queue_fault_is_a_temporary_failure(stack: tuple[Any, Any, Any]) -> None:
    """When SQS refuses the message, the task is a TemporaryFailure, which Batch Operations retries."""
    s3, sqs, outputs = stack
    s3.put_object(Bucket=outputs.input_bucket, Key="incoming/film.jpeg", Body=b"x")
    refusing = FaultInjectingClient(sqs, {"send_message": (1.0, "ThrottlingException")}, random.Random(0))
    settings = BatchBackfillSettings(outputs.queue_url, outputs.input_bucket, outputs.input_prefix)
    batch_backfill.enqueuer.set(BackfillEnqueuer(s3, refusing, settings))
    result = invoke(outputs.input_bucket, "incoming/film.jpeg")
    assert result["resultCode"] == "TemporaryFailure"
