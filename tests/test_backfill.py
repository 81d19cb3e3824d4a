"""The backfill: paginated listing, resumable after a failure, rate-limited, one request per object."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from core.events import parse_message_body
from infra.fault_injection import FaultInjectingClient
from infra.local_stack import drain as drain_queue
from pneumoscan.backfill import Backfill, BackfillError, BackfillPlan, BackfillState, RateLimiter

REGION = "us-east-1"
BUCKET = "uploads"


@pytest.fixture
def clients() -> Iterator[tuple[Any, Any, str]]:
    """A bucket with 25 objects under incoming/ (and a folder marker and one object elsewhere), and a queue."""
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="incoming/", Body=b"")
        for index in range(25):
            s3.put_object(Bucket=BUCKET, Key=f"incoming/{index:03d}.jpeg", Body=b"x" * (index + 1))
        s3.put_object(Bucket=BUCKET, Key="elsewhere/skip.jpeg", Body=b"x")
        yield s3, sqs, sqs.create_queue(QueueName="scoring")["QueueUrl"]


def plan(queue_url: str, model_version: str = "model-a") -> BackfillPlan:
    return BackfillPlan(BUCKET, "incoming/", queue_url, model_version, messages_per_second=1e6)


def drain(sqs: Any, queue_url: str) -> list[str]:
    """The keys of every message on the queue."""
    keys = []
    for message in drain_queue(sqs, queue_url):
        [ref] = parse_message_body(message["Body"])
        keys.append(ref.key)
    return keys


class PagedS3:
    """An S3 client whose listings come back two objects per page, so pagination is exercised."""

    def __init__(self, s3: Any) -> None:
        self._s3 = s3

    def get_paginator(self, name: str) -> Any:
        paginator = self._s3.get_paginator(name)

        class Small:
            def paginate(self, **arguments: Any) -> Any:
                return paginator.paginate(**arguments, PaginationConfig={"PageSize": 2})

        return Small()


def test_every_object_under_the_prefix_is_enqueued_once(clients: tuple[Any, Any, str], tmp_path: Path) -> None:
    """Each object under the prefix becomes one backfill request with its ETag, size and the model version."""
    s3, sqs, queue_url = clients
    state = Backfill(PagedS3(s3), sqs, plan(queue_url), tmp_path / "state.json").run()
    assert state.finished and state.enqueued == 25
    keys = drain(sqs, queue_url)
    assert sorted(keys) == [f"incoming/{index:03d}.jpeg" for index in range(25)]


def test_request_carries_what_the_function_needs(clients: tuple[Any, Any, str], tmp_path: Path) -> None:
    """A request names the object, its ETag and size, and pins the model that must score it."""
    s3, sqs, queue_url = clients
    Backfill(s3, sqs, plan(queue_url), tmp_path / "state.json").run()
    body = sqs.receive_message(QueueUrl=queue_url)["Messages"][0]["Body"]
    [ref] = parse_message_body(body)
    head = s3.head_object(Bucket=BUCKET, Key=ref.key)
    assert ref.etag == head["ETag"].strip('"')
    assert ref.size == head["ContentLength"]
    assert ref.backfill_model == "model-a"
    assert json.loads(body)["source"] == "pneumoscan.backfill"


def test_a_failed_run_resumes_after_the_last_recorded_batch(clients: tuple[Any, Any, str], tmp_path: Path) -> None:
    """When the queue refuses messages the run stops; the next run sends only what the first did not."""
    s3, sqs, queue_url = clients
    state_path = tmp_path / "state.json"
    refusing = FaultInjectingClient(sqs, {"send_message_batch": (1.0, "ThrottlingException")}, random.Random(0))
    calls = {"count": 0}

    def fail_after_two_batches(**arguments: Any) -> Any:
        calls["count"] += 1
        if calls["count"] <= 2:
            return sqs.send_message_batch(**arguments)
        return refusing.send_message_batch(**arguments)

    class FlakyQueue:
        send_message_batch = staticmethod(fail_after_two_batches)

    with pytest.raises(BackfillError, match="refused"):
        Backfill(s3, FlakyQueue(), plan(queue_url), state_path, sleep=lambda _: None).run()
    saved = BackfillState.load_or_start(state_path, plan(queue_url))
    assert (saved.enqueued, saved.last_key, saved.finished) == (20, "incoming/019.jpeg", False)
    state = Backfill(s3, sqs, plan(queue_url), state_path).run()
    assert state.finished and state.enqueued == 25
    assert sorted(drain(sqs, queue_url)) == [f"incoming/{index:03d}.jpeg" for index in range(25)]


def test_a_state_file_of_another_backfill_is_refused(clients: tuple[Any, Any, str], tmp_path: Path) -> None:
    """Resuming with the state of another prefix or model would skip objects, so it is an error."""
    s3, sqs, queue_url = clients
    state_path = tmp_path / "state.json"
    Backfill(s3, sqs, plan(queue_url, "model-a"), state_path).run()
    with pytest.raises(BackfillError, match="belongs to the backfill"):
        Backfill(s3, sqs, plan(queue_url, "model-b"), state_path).run()


def test_rate_limiter_spaces_batches() -> None:
    """At 50 messages per second, 100 messages in batches of 10 take about two seconds of waiting."""
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(50, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        limiter.wait(10)
    assert sum(slept) == pytest.approx(1.8)
    assert all(seconds == pytest.approx(0.2) for seconds in slept)
