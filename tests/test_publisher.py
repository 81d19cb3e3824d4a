"""The result publisher: stream records of new results -> EventBridge events, retrying only what failed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from infra.local_stack import DynamoDbStreamEmulator, LocalContext, StreamEventSourceMapping
from infra.template import load_template
from publisher import handler as publisher


def stream_record(sequence: str, key: str) -> dict[str, Any]:
    image = {
        "image_key": {"S": f"s3://in/{key}"},
        "object_sequence": {"S": "01"},
        "status": {"S": "SCORED"},
        "object_size": {"N": "42"},
        "confidence": {"N": "0.75"},
    }
    return {
        "eventID": sequence,
        "eventName": "INSERT",
        "eventSource": "aws:dynamodb",
        "dynamodb": {"Keys": {}, "NewImage": image, "SequenceNumber": sequence, "StreamViewType": "NEW_IMAGE"},
    }


class EventsClient:
    """Records PutEvents calls; entries whose detail names a key in ``refuse`` come back failed."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.published: list[dict[str, Any]] = []

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803  # boto3's parameter name.
        assert len(Entries) <= 10
        results = []
        for entry in Entries:
            detail = json.loads(entry["Detail"])
            if detail["image_key"].rsplit("/", 1)[-1] in self.refuse:
                results.append({"ErrorCode": "InternalFailure", "ErrorMessage": "try again"})
            else:
                self.published.append(detail)
                results.append({"EventId": str(len(self.published))})
        return {"FailedEntryCount": sum("ErrorCode" in r for r in results), "Entries": results}


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[EventsClient]:
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "pneumoscan")
    client = EventsClient(refuse=set())
    publisher.feed.set(publisher.EventFeed(client, "results-bus"))
    yield client
    publisher.feed.set(None)


def test_every_new_result_becomes_one_event(events: EventsClient) -> None:
    """Twelve inserts are published in two PutEvents calls, with plain JSON numbers."""
    records = [stream_record(f"{index:03d}", f"k{index}") for index in range(12)]
    response = publisher.lambda_handler({"Records": records}, LocalContext())
    assert response == {"batchItemFailures": []}
    assert [detail["image_key"] for detail in events.published] == [f"s3://in/k{index}" for index in range(12)]
    assert events.published[0]["object_size"] == 42 and events.published[0]["confidence"] == 0.75


def test_refused_events_are_reported_for_retry(events: EventsClient) -> None:
    """Entries EventBridge refuses come back as batch item failures, named by their sequence numbers."""
    events.refuse = {"k1"}
    records = [stream_record(f"{index:03d}", f"k{index}") for index in range(3)]
    response = publisher.lambda_handler({"Records": records}, LocalContext())
    assert response == {"batchItemFailures": [{"itemIdentifier": "001"}]}


class OneShardStream:
    """A streams client with one shard holding the given records."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self._records = records

    def describe_stream(self, StreamArn: str) -> dict[str, Any]:  # noqa: N803  # boto3's parameter name.
        return {"StreamDescription": {"Shards": [{"ShardId": "shard-1"}]}}

    def get_shard_iterator(self, **_: Any) -> dict[str, Any]:
        return {"ShardIterator": "0"}

    def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:  # noqa: N803  # boto3's parameter name.
        start = int(ShardIterator)
        return {"Records": self._records[start : start + Limit], "NextShardIterator": str(start + Limit)}


def test_stream_emulator_retries_from_the_first_failure_then_parks(events: EventsClient) -> None:
    """Like Lambda, a failed record is retried with those after it, and parked once the retries are spent."""
    events.refuse = {"k2"}
    records = [stream_record(f"{index:03d}", f"k{index}") for index in range(4)]
    mapping = StreamEventSourceMapping.from_template(load_template())
    assert mapping.event_names == frozenset({"INSERT"})
    emulator = DynamoDbStreamEmulator(OneShardStream(records), "arn:stream", publisher.lambda_handler, mapping)
    emulator.poll_once()
    keys = [detail["image_key"].rsplit("/", 1)[-1] for detail in events.published]
    # k3 is published on every attempt after k2's failure: at-least-once, as consumers are told.
    assert keys == ["k0", "k1", "k3"] + ["k3"] * mapping.maximum_retry_attempts
    assert emulator.parked == 2
