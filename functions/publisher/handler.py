"""The result feed: every new item of the results table, read from its stream, becomes one EventBridge event.

Reading the stream rather than publishing from the scoring function keeps one source of truth: an event exists
exactly when a result was written, and a failed publish is retried by the stream's event source without touching
the table. Delivery is at least once; ``detail.result_id`` identifies a result for consumers that deduplicate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from core.config import ConfigurationError
from core.provider import Provider

EVENT_SOURCE = "pneumoscan"
DETAIL_TYPE = "pneumoscan.result"
PUT_EVENTS_MAX_ENTRIES = 10

logger = Logger(service="pneumoscan-publisher")
tracer = Tracer(service="pneumoscan-publisher")
metrics = Metrics(namespace="pneumoscan", service="pneumoscan-publisher")
processor = BatchProcessor(event_type=EventType.DynamoDBStreams, raise_on_entire_batch_failure=False)


class EventNotPublishedError(RuntimeError):
    """EventBridge did not take this result's event; the stream record is retried."""


@dataclass(frozen=True)
class PublisherSettings:
    """Where result events go."""

    event_bus_name: str

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] = os.environ) -> PublisherSettings:
        if not environment.get("EVENT_BUS_NAME"):
            raise ConfigurationError("environment variable EVENT_BUS_NAME is required")
        return cls(event_bus_name=environment["EVENT_BUS_NAME"])


def result_detail(new_image: Mapping[str, Any]) -> dict[str, Any]:
    """The event detail of one results-table item: its attributes as plain JSON, plus a ``result_id``."""
    detail = {name: _plain(value) for name, value in new_image.items()}
    detail["result_id"] = f"{detail['image_key']}#{detail['object_sequence']}"
    return detail


def _plain(value: Any) -> Any:
    """DynamoDB numbers arrive as Decimal: integral ones become int, the others float."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class EventFeed:
    """Puts result events on the results bus, ten to a request, and says which ones failed."""

    def __init__(self, events_client: Any, bus_name: str) -> None:
        self._events = events_client
        self.bus_name = bus_name

    def publish(self, details: Sequence[dict[str, Any]]) -> list[str | None]:
        """Publish every detail; per detail, None when EventBridge took it, else why it did not."""
        outcomes: list[str | None] = []
        for start in range(0, len(details), PUT_EVENTS_MAX_ENTRIES):
            chunk = details[start : start + PUT_EVENTS_MAX_ENTRIES]
            entries = [
                {
                    "Source": EVENT_SOURCE,
                    "DetailType": DETAIL_TYPE,
                    "Detail": json.dumps(detail, separators=(",", ":")),
                    "EventBusName": self.bus_name,
                }
                for detail in chunk
            ]
            try:
                response = self._events.put_events(Entries=entries)
            except (ClientError, BotoCoreError) as error:
                outcomes.extend(str(error) for _ in chunk)
                continue
            outcomes.extend(
                f"{entry['ErrorCode']}: {entry.get('ErrorMessage', '')}" if entry.get("ErrorCode") else None
                for entry in response["Entries"]
            )
        return outcomes


feed = Provider(lambda: EventFeed(boto3.client("events"), PublisherSettings.from_environment().event_bus_name))
"""The feed of this execution environment; the local stack wires its own client."""


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    # Only inserts reach the function (the event source filters on them); a record without an image is skipped.
    new_images = {
        record.dynamodb.sequence_number: record.dynamodb.new_image
        for record in (DynamoDBRecord(raw) for raw in event.get("Records", []))
        if record.dynamodb is not None and record.dynamodb.new_image
    }
    outcomes = feed.get().publish([result_detail(image) for image in new_images.values()])
    failures = {sequence: why for sequence, why in zip(new_images, outcomes, strict=True) if why}
    metrics.add_metric(name="ResultEventsPublished", unit=MetricUnit.Count, value=len(new_images) - len(failures))
    if failures:
        metrics.add_metric(name="ResultEventsFailed", unit=MetricUnit.Count, value=len(failures))

    def check(record: DynamoDBRecord) -> None:
        sequence = record.dynamodb.sequence_number if record.dynamodb is not None else None
        if sequence in failures:
            logger.warning("result event not published; the record is retried", extra={"why": failures[sequence]})
            raise EventNotPublishedError(failures[sequence])

    return process_partial_response(event=event, record_handler=check, processor=processor, context=context)
