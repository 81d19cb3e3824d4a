"""The local stack: template.yaml's data plane on a moto server, an SQS event-source-mapping emulator that feeds
the real scoring handler with Lambda's semantics, and a DynamoDB-stream emulator that feeds the real result
publisher, which puts one event per result on the results bus.

The emulator reads the function's SQS event from the template (batch size, batching window,
``ReportBatchItemFailures``, ``ScalingConfig.MaximumConcurrency``). Like Lambda it receives a batch with the queue's
visibility timeout, invokes the handler, deletes the messages that succeeded, and leaves failed ones to reappear
after the visibility timeout; SQS itself (moto) moves a message to the dead-letter queue once it has been received
``maxReceiveCount`` times.

Like Lambda's poller it runs several invocations at once: at most ``MaximumConcurrency`` when the event source
declares it, and it receives no batch while that many are running, so a backlog waits in the queue. Without the cap
it runs as many pollers as it is given (Lambda starts with five), and an invocation beyond the function's concurrency
limit (its reserved concurrency, or the account's) is throttled: its batch is not handled, and comes back after the
visibility timeout with one more receive counted towards ``maxReceiveCount``, as under Lambda.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import boto3
from moto.server import ThreadedMotoServer

from core.model_card import read_card
from core.model_registry import ModelRegistry, NoCurrentModelError
from core.results import plain_item
from infra.lambda_process import InvocationKilledError, LambdaLimits, LambdaProcess, SharedState
from infra.moto_atomicity import make_dynamodb_writes_atomic
from infra.resources import create_data_plane
from infra.template import evaluate_conditions, load_template, parameter_defaults
from pneumoscan.stack import StackOutputs
from publisher import handler as publisher
from scoring import handler
from scoring.model_provider import ModelUnavailableError
from scoring.settings import Settings, accepted_ages, heatmap_policy

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Any], Any]


def drain(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Receive and delete every message waiting on the queue; the messages, as SQS returns them."""
    drained: list[dict[str, Any]] = []
    while messages := sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", []):
        for message in messages:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        drained.extend(messages)
    return drained


def scan_results(dynamodb: Any, table_name: str) -> list[dict[str, Any]]:
    """Every item of the results table as plain values (a whole-table read for the harness, never the function)."""
    pages = dynamodb.get_paginator("scan").paginate(TableName=table_name)
    return [plain_item(item) for page in pages for item in page["Items"]]


LAMBDA_INITIAL_POLLERS = 5
"""How many batches Lambda's SQS poller starts with, without a ``MaximumConcurrency`` (it scales up from there)."""


def resolved(template: dict[str, Any], value: Any, parameters: dict[str, Any] | None = None) -> Any:
    """A property's value for these parameters (the template's defaults where one is not given): ``Ref`` to a
    parameter, ``Fn::If`` on the template's conditions, and ``AWS::NoValue`` (None)."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        if value["Ref"] == "AWS::NoValue":
            return None
        return {**parameter_defaults(template), **(parameters or {})}[value["Ref"]]
    if isinstance(value, dict) and set(value) == {"Fn::If"}:
        condition, when_true, when_false = value["Fn::If"]
        chosen = when_true if evaluate_conditions(template, parameters)[condition] else when_false
        return resolved(template, chosen, parameters)
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class EventSourceMapping:
    """The SQS event of the scoring function, as the template declares it."""

    batch_size: int
    batching_window_seconds: float
    report_batch_item_failures: bool
    maximum_concurrency: int | None = None
    """``ScalingConfig.MaximumConcurrency``: the most invocations the poller runs at once; None when not declared."""

    @classmethod
    def from_template(
        cls, template: dict[str, Any], function: str = "ScoringFunction", parameters: dict[str, Any] | None = None
    ) -> EventSourceMapping:
        events = template["Resources"][function]["Properties"]["Events"]
        properties = next(event["Properties"] for event in events.values() if event["Type"] == "SQS")
        scaling = resolved(template, properties.get("ScalingConfig"), parameters) or {}
        return cls(
            batch_size=int(properties.get("BatchSize", 10)),
            batching_window_seconds=float(properties.get("MaximumBatchingWindowInSeconds", 0)),
            report_batch_item_failures="ReportBatchItemFailures" in properties.get("FunctionResponseTypes", []),
            maximum_concurrency=_optional_int(resolved(template, scaling.get("MaximumConcurrency"), parameters)),
        )


def reserved_concurrency(
    template: dict[str, Any], function: str = "ScoringFunction", parameters: dict[str, Any] | None = None
) -> int | None:
    """The function's ``ReservedConcurrentExecutions`` for these parameters; None when it reserves none."""
    value = template["Resources"][function]["Properties"].get("ReservedConcurrentExecutions")
    return _optional_int(resolved(template, value, parameters))


def with_maximum_concurrency(
    template: dict[str, Any], parameters: dict[str, Any], cap: int, function: str = "ScoringFunction"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The template and parameters with the function's SQS event capped at ``cap`` invocations: through the
    parameter the template's ``MaximumConcurrency`` names, or as a ``ScalingConfig`` of its own when it has none."""
    template = copy.deepcopy(template)
    events = template["Resources"][function]["Properties"]["Events"]
    properties = next(event["Properties"] for event in events.values() if event["Type"] == "SQS")
    declared = properties.get("ScalingConfig", {}).get("MaximumConcurrency")
    if isinstance(declared, dict) and set(declared) == {"Ref"}:
        return template, {**parameters, declared["Ref"]: cap}
    properties["ScalingConfig"] = {"MaximumConcurrency": cap}
    return template, parameters


@dataclass(frozen=True)
class LocalContext:
    """The parts of Lambda's context object that Powertools reads."""

    function_name: str = "pneumoscan-scoring-local"
    memory_limit_in_mb: int = 1024
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:pneumoscan-scoring-local"
    aws_request_id: str = ""
    timeout_seconds: float = 60.0
    """The scoring function's timeout in the template."""
    started_at: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        """What is left of the invocation's time, as Lambda's context says it."""
        return max(0, int((self.timeout_seconds - (time.monotonic() - self.started_at)) * 1000))


@dataclass
class DeliveryStats:
    """What the emulator has done so far."""

    invocations: int = 0
    messages_deleted: int = 0
    messages_failed: int = 0
    handler_crashes: int = 0
    duplicates_sent: int = 0
    throttled_invocations: int = 0
    """Batches received but not handled: the function was at its concurrency limit (they come back later)."""
    peak_concurrency: int = 0
    """The most invocations that ran at once."""


class _Poller:
    """An event source that polls until stopped, resting while there is nothing to deliver."""

    def poll_once(self) -> int:
        raise NotImplementedError

    def run(self, stop: threading.Event, idle_sleep: float = 0.1) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            if self.poll_once() == 0:
                stop.wait(idle_sleep)


class SqsEventSourceEmulator(_Poller):
    """Polls the queue and invokes the handler with Lambda's SQS batch semantics."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        handler: Handler,
        mapping: EventSourceMapping,
        *,
        visibility_timeout: int | None = None,
        retry_delay_seconds: int | None = None,
        duplicate_rate: float = 0.0,
        rng: random.Random | None = None,
        region: str = "us-east-1",
        pollers: int = LAMBDA_INITIAL_POLLERS,
        concurrency_limit: int | None = None,
    ) -> None:
        """``retry_delay_seconds`` makes failed messages visible again sooner than the visibility timeout would
        (soak tests and demos); by default they wait out the visibility timeout, as under Lambda.
        ``duplicate_rate`` re-sends that share of first deliveries as a second message with the same body, as S3's
        at-least-once notifications do.
        ``run`` runs at most the mapping's ``maximum_concurrency`` invocations at once, or ``pollers`` without one;
        an invocation beyond ``concurrency_limit`` (the function's reserved concurrency, or the account's; None:
        none) is throttled."""
        self._sqs = sqs
        self._failed_deliveries: Counter[str] = Counter()
        self._killed_deliveries: Counter[str] = Counter()
        """Deliveries whose invocation was killed past the function's memory size or timeout, by message."""
        self._bodies: dict[str, str] = {}
        self._duplicate_rate = duplicate_rate
        self._rng = rng or random.Random(0)
        self._retry_delay_seconds = retry_delay_seconds
        self._queue_url = queue_url
        self._handler = handler
        self._mapping = mapping
        self._visibility_timeout = visibility_timeout
        self._region = region
        self._queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.stats = DeliveryStats()
        self.batches: list[list[str]] = []
        """The message bodies of every invocation, in order: which uploads shared a batch."""
        self.slots = mapping.maximum_concurrency or pollers
        """The most invocations ``run`` has in flight at once."""
        self._concurrency_limit = concurrency_limit
        self._running = 0
        self._lock = threading.Lock()
        """Invocations run on their own threads; the counts above are changed under this lock."""

    def poll_once(self) -> int:
        """Gather one batch (up to the batch size, within the batching window) and deliver it on this thread;
        returns its size."""
        messages = self._gather()
        if messages:
            self._duplicate_some(messages)
            self._deliver(messages)
        return len(messages)

    def run(self, stop: threading.Event, idle_sleep: float = 0.1) -> None:
        """Poll until ``stop`` is set, with at most ``slots`` invocations in flight: no batch is received while
        every slot is taken, so the rest of a backlog waits in the queue (Lambda's poller under
        ``MaximumConcurrency``). Invocations still running when ``stop`` is set are finished."""
        free = threading.BoundedSemaphore(self.slots)

        def deliver(messages: list[dict[str, Any]]) -> None:
            try:
                self._deliver(messages)
            finally:
                free.release()

        with ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="sqs-invocation") as invocations:
            while not stop.is_set():
                if not free.acquire(timeout=idle_sleep):
                    continue
                messages = self._gather()
                if not messages:
                    free.release()
                    stop.wait(idle_sleep)
                    continue
                self._duplicate_some(messages)
                invocations.submit(deliver, messages)

    def _gather(self) -> list[dict[str, Any]]:
        """One batch: up to the batch size, within the batching window."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + self._mapping.batching_window_seconds
        while len(messages) < self._mapping.batch_size:
            arguments: dict[str, Any] = {
                "QueueUrl": self._queue_url,
                "MaxNumberOfMessages": min(10, self._mapping.batch_size - len(messages)),
                "AttributeNames": ["All"],
                "MessageAttributeNames": ["All"],
                "WaitTimeSeconds": 0,
            }
            if self._visibility_timeout is not None:
                arguments["VisibilityTimeout"] = self._visibility_timeout
            received = self._sqs.receive_message(**arguments).get("Messages", [])
            messages.extend(received)
            if not received and (messages or time.monotonic() >= deadline):
                break
            if not received:
                time.sleep(0.05)
        return messages

    def _deliver(self, messages: list[dict[str, Any]]) -> None:
        """Invoke the handler with the batch, unless the function is at its concurrency limit (throttled)."""
        with self._lock:
            self._bodies.update((message["MessageId"], message["Body"]) for message in messages)
            throttled = self._concurrency_limit is not None and self._running >= self._concurrency_limit
            if throttled:
                self.stats.throttled_invocations += 1
                self.stats.messages_failed += len(messages)
                self._failed_deliveries.update(message["MessageId"] for message in messages)
            else:
                self._running += 1
                self.stats.peak_concurrency = max(self.stats.peak_concurrency, self._running)
                self.stats.invocations += 1
                self.batches.append([message["Body"] for message in messages])
        if throttled:
            # Lambda refuses the invocation; the batch stays invisible until its visibility timeout ends.
            self._schedule_retry(messages)
            return
        try:
            self._invoke(messages)
        finally:
            with self._lock:
                self._running -= 1

    def _invoke(self, messages: list[dict[str, Any]]) -> None:
        event = {"Records": [self._record(message) for message in messages]}
        try:
            response = self._handler(event, LocalContext(aws_request_id=str(uuid.uuid4())))
        except Exception as crash:  # A crashed invocation, whatever the cause, leaves the whole batch for retry.
            logger.exception("handler crashed; the whole batch of %d becomes visible again", len(messages))
            with self._lock:
                self.stats.handler_crashes += 1
                self.stats.messages_failed += len(messages)
                self._failed_deliveries.update(message["MessageId"] for message in messages)
                if isinstance(crash, InvocationKilledError):
                    self._killed_deliveries.update(message["MessageId"] for message in messages)
            self._schedule_retry(messages)
            return
        failed: set[str] = set()
        if self._mapping.report_batch_item_failures and isinstance(response, dict):
            failed = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        done = [message for message in messages if message["MessageId"] not in failed]
        for start in range(0, len(done), 10):
            entries = [
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(done[start : start + 10])
            ]
            self._sqs.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
        with self._lock:
            self.stats.messages_deleted += len(done)
            self.stats.messages_failed += len(messages) - len(done)
            self._failed_deliveries.update(failed)
        self._schedule_retry([message for message in messages if message["MessageId"] in failed])

    def exhausted(self, max_receive_count: int) -> int:
        """How many messages failed every one of their ``max_receive_count`` deliveries: SQS dead-letters them."""
        return sum(count >= max_receive_count for count in self._failed_deliveries.values())

    def exhausted_by_faults(self, max_receive_count: int) -> list[str]:
        """The bodies of the dead-lettered messages whose deliveries were killed at most once: a message that shared
        its first batch with a file that kills its invocation loses that one delivery, however the function is
        written (Lambda kills the process); the other failures were the fault plan's."""
        return [
            self._bodies[message_id]
            for message_id, count in self._failed_deliveries.items()
            if count >= max_receive_count and self._killed_deliveries[message_id] <= 1
        ]

    def killed_more_than_once(self) -> list[str]:
        """The bodies of the messages more than one of whose deliveries were killed: the function isolates every
        decode of a batch holding a retried record, so there must be none."""
        return [self._bodies[message_id] for message_id, count in self._killed_deliveries.items() if count > 1]

    def _duplicate_some(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            first_delivery = message.get("Attributes", {}).get("ApproximateReceiveCount") == "1"
            is_duplicate = message.get("MessageAttributes", {}).get("duplicate") is not None
            if first_delivery and not is_duplicate and self._rng.random() < self._duplicate_rate:
                self._sqs.send_message(
                    QueueUrl=self._queue_url,
                    MessageBody=message["Body"],
                    MessageAttributes={"duplicate": {"DataType": "String", "StringValue": message["MessageId"]}},
                )
                self.stats.duplicates_sent += 1

    def _schedule_retry(self, messages: list[dict[str, Any]]) -> None:
        if self._retry_delay_seconds is None:
            return
        for message in messages:
            self._sqs.change_message_visibility(
                QueueUrl=self._queue_url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=self._retry_delay_seconds,
            )

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        """A message in the shape of Lambda's SQS event record."""
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": message.get("MessageAttributes", {}),
            "md5OfBody": message.get("MD5OfBody", ""),
            "eventSource": "aws:sqs",
            "eventSourceARN": self._queue_arn,
            "awsRegion": self._region,
        }


@dataclass(frozen=True)
class StreamEventSourceMapping:
    """The DynamoDB stream event of the result publisher, as the template declares it."""

    batch_size: int
    maximum_retry_attempts: int
    event_names: frozenset[str] | None
    """The event names the filter lets through; None when the event source has no filter."""

    @classmethod
    def from_template(
        cls, template: dict[str, Any], function: str = "ResultPublisherFunction"
    ) -> StreamEventSourceMapping:
        events = template["Resources"][function]["Properties"]["Events"]
        properties = next(event["Properties"] for event in events.values() if event["Type"] == "DynamoDB")
        names: set[str] = set()
        for pattern in properties.get("FilterCriteria", {}).get("Filters", []):
            names.update(json.loads(pattern["Pattern"]).get("eventName", []))
        return cls(
            batch_size=int(properties.get("BatchSize", 100)),
            maximum_retry_attempts=int(properties.get("MaximumRetryAttempts", -1)),
            event_names=frozenset(names) or None,
        )


class DynamoDbStreamEmulator(_Poller):
    """Reads the table's stream from its start and invokes the handler with Lambda's stream batch semantics:
    in order per shard, and after a partial failure again from the first failed record, until the retry budget
    is spent (then the batch's description goes to the on-failure queue, as Lambda's destination does)."""

    def __init__(
        self,
        streams: Any,
        stream_arn: str,
        handler: Handler,
        mapping: StreamEventSourceMapping,
        *,
        sqs: Any = None,
        on_failure_queue_url: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        self._streams = streams
        self._stream_arn = stream_arn
        self._handler = handler
        self._mapping = mapping
        self._sqs = sqs
        self._on_failure_queue_url = on_failure_queue_url
        self._region = region
        self._iterators: dict[str, str | None] = {}
        self.parked = 0

    def poll_once(self) -> int:
        """Deliver what each shard has gathered since the last poll; returns how many records were read."""
        shards = self._streams.describe_stream(StreamArn=self._stream_arn)["StreamDescription"]["Shards"]
        read = 0
        for shard in shards:
            shard_id = shard["ShardId"]
            if shard_id not in self._iterators:
                self._iterators[shard_id] = self._streams.get_shard_iterator(
                    StreamArn=self._stream_arn, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
                )["ShardIterator"]
            iterator = self._iterators[shard_id]
            if iterator is None:
                continue
            response = self._streams.get_records(ShardIterator=iterator, Limit=self._mapping.batch_size)
            self._iterators[shard_id] = response.get("NextShardIterator")
            records = response.get("Records", [])
            read += len(records)
            wanted = [
                record
                for record in records
                if self._mapping.event_names is None or record["eventName"] in self._mapping.event_names
            ]
            if wanted:
                self._deliver([self._record(record) for record in wanted])
        return read

    def _deliver(self, records: list[dict[str, Any]]) -> None:
        attempts = 0
        while records:
            try:
                response = self._handler({"Records": records}, LocalContext(aws_request_id=str(uuid.uuid4())))
                failed = {item["itemIdentifier"] for item in (response or {}).get("batchItemFailures", [])}
            except Exception:  # A crashed invocation, whatever the cause, retries the whole batch.
                logger.exception("stream handler crashed; its batch of %d is retried", len(records))
                failed = {records[0]["dynamodb"]["SequenceNumber"]}
            first_failed = next(
                (index for index, record in enumerate(records) if record["dynamodb"]["SequenceNumber"] in failed),
                None,
            )
            if first_failed is None:
                return
            records = records[first_failed:]
            attempts += 1
            if 0 <= self._mapping.maximum_retry_attempts < attempts:
                self._park(records)
                return

    def _park(self, records: list[dict[str, Any]]) -> None:
        """Describe the records that failed every retry on the on-failure queue, as Lambda does."""
        self.parked += len(records)
        if self._sqs is None or self._on_failure_queue_url is None:
            return
        sequence_numbers = [record["dynamodb"]["SequenceNumber"] for record in records]
        self._sqs.send_message(
            QueueUrl=self._on_failure_queue_url,
            MessageBody=json.dumps(
                {
                    "DDBStreamBatchInfo": {
                        "streamArn": self._stream_arn,
                        "startSequenceNumber": sequence_numbers[0],
                        "endSequenceNumber": sequence_numbers[-1],
                        "batchSize": len(records),
                    }
                }
            ),
        )

    def _record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A stream record in the shape of Lambda's DynamoDB event record."""
        change = dict(record["dynamodb"])
        created = change.get("ApproximateCreationDateTime")
        if isinstance(created, datetime):
            # Lambda's event carries epoch seconds where the streams API (through boto3) gives a datetime.
            change["ApproximateCreationDateTime"] = int(created.timestamp())
        return {
            "eventID": record["eventID"],
            "eventName": record["eventName"],
            "eventVersion": record.get("eventVersion", "1.1"),
            "eventSource": "aws:dynamodb",
            "awsRegion": self._region,
            "dynamodb": change,
            "eventSourceARN": self._stream_arn,
        }


class Interposer(Protocol):
    """What a harness may put around the stack's functions: the soak's fault injection
    (``infra.fault_injection.FaultInjection``), which this module never imports."""

    rng: random.Random
    """The generator of the emulator's duplicate notifications (shared with the harness's own draws)."""
    duplicate_rate: float
    """Share of S3 notifications the emulator delivers twice, as separate SQS messages."""

    def enter(self) -> None:
        """The stack starts."""

    def exit(self) -> None:
        """The stack stops."""

    def client(self, operation_owner: str, service: str, client: Any) -> Any:
        """The client that a function (``scoring`` or ``publisher``) is given for ``service``."""

    def shared_state(self) -> SharedState | None:
        """The harness's state that an invocation's process changes, to bring back from it."""

    def scoring_handler(self, invoke: Handler) -> Handler:
        """The scoring handler as the emulator invokes it."""


class QuietFunctions:
    """Keeps the in-process functions' per-image logs and metrics off the terminal (demo and soak), and restores
    the loggers and the environment afterwards. Powertools keeps disabled metrics instead of flushing them, and
    prints them anyway once a metric holds 100 values, so a quiet stack clears them after every invocation."""

    def __init__(self) -> None:
        self._levels = {module: module.logger.log_level for module in (handler, publisher)}
        self._metrics_disabled = os.environ.get("POWERTOOLS_METRICS_DISABLED")

    def enter(self) -> None:
        handler.logger.setLevel(logging.WARNING)
        # Failed publishes are retried by design (and injected by the soak): only errors are worth a line.
        publisher.logger.setLevel(logging.ERROR)
        os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"

    @staticmethod
    def wrap(invoke: Handler, metrics: Any) -> Handler:
        """The handler, dropping its metrics after every invocation."""

        def run(event: dict[str, Any], context: Any) -> Any:
            try:
                return invoke(event, context)
            finally:
                metrics.clear_metrics()

        return run

    def exit(self) -> None:
        # Disabled metrics are never flushed, so they are dropped here rather than leak into a later flush.
        for module, level in self._levels.items():
            module.metrics.clear_metrics()
            module.logger.setLevel(level)
        if self._metrics_disabled is None:
            os.environ.pop("POWERTOOLS_METRICS_DISABLED", None)
        else:
            os.environ["POWERTOOLS_METRICS_DISABLED"] = self._metrics_disabled


def _load_model() -> None:
    """Load the served model into the scoring pipeline of this process, if one is promoted."""
    try:
        handler.pipeline.get().load_model()
    except ModelUnavailableError:
        return  # Nothing is promoted yet: the invocation fails and its messages wait, as in AWS.


def _one_at_a_time(invoke: Handler) -> Handler:
    """An in-process handler whose invocations take turns: they share one pipeline (one LiteRT interpreter, which is
    not thread-safe) and Powertools' module state. Each still counts as running while it waits, so the emulator's
    concurrency cap and throttling behave as in Lambda; only the work is serialised (``lambda_process`` runs each
    invocation in a process of its own, at once)."""
    turn = threading.Lock()

    def run(event: dict[str, Any], context: Any) -> Any:
        with turn:
            return invoke(event, context)

    return run


def _is_s3_test_event(body: str) -> bool:
    """S3's message on a new notification configuration: no upload, and scored by nothing."""
    try:
        return bool(json.loads(body).get("Event") == "s3:TestEvent")
    except (ValueError, AttributeError):  # Not JSON, or not an object: a message of some other kind.
        return False


class LocalStack:
    """A moto server with the template's resources and the scoring handler attached to the queue."""

    def __init__(
        self,
        port: int = 0,
        *,
        region: str = "us-east-1",
        retry_delay_seconds: int | None = None,
        parameters: dict[str, Any] | None = None,
        interposer: Interposer | None = None,
        quiet: bool = False,
        on_waiting_without_model: Callable[[int], None] | None = None,
        lambda_process: bool = False,
        template: dict[str, Any] | None = None,
        account_concurrency: int | None = None,
    ) -> None:
        """``interposer`` wraps the functions' clients and handler (the soak's fault injection).
        ``quiet`` keeps the handler's per-image logs and metrics off the terminal (demo and soak).
        ``lambda_process`` runs each scoring invocation in a forked child under the function's memory size and
        timeout from the template, killed past either as Lambda kills it (``infra.lambda_process``; the soak).
        ``on_waiting_without_model`` is told, once per delivered batch, how many messages arrived while no model
        is promoted (they fail and wait for a retry, then the dead-letter queue).
        ``template`` is template.yaml as loaded (``infra.template.load_template``), or a variant of it (a burst test
        caps the event source with ``with_maximum_concurrency``). ``account_concurrency`` is the account's
        unreserved concurrency: with the function's reservation, if any, it limits the invocations running at
        once; one beyond it is throttled (None: no limit but the event source's own)."""
        self._quiet = quiet
        self._lambda_process = lambda_process
        self.lambda_process: LambdaProcess | None = None
        self._on_waiting_without_model = on_waiting_without_model
        self._quieted: QuietFunctions | None = None
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # One line per request would bury everything else.
        self._region = region
        self._retry_delay_seconds = retry_delay_seconds
        self._parameters = parameters or {}
        self._template = template
        self._account_concurrency = account_concurrency
        self.interposer = interposer
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.outputs: StackOutputs | None = None
        self.emulator: SqsEventSourceEmulator | None = None
        self.stream_emulator: DynamoDbStreamEmulator | None = None

    def redrive_policy(self) -> dict[str, Any]:
        """The scoring queue's redrive policy as SQS reports it."""
        assert self.outputs is not None, "start() the stack first"
        attributes = self.client("sqs").get_queue_attributes(
            QueueUrl=self.outputs.queue_url, AttributeNames=["RedrivePolicy"]
        )
        policy: dict[str, Any] = json.loads(attributes["Attributes"]["RedrivePolicy"])
        return policy

    def subscribe(self, name: str) -> str:
        """A downstream system: a new queue that a rule on the results bus feeds with every result event."""
        assert self.outputs is not None, "start() the stack first"
        sqs, events = self.client("sqs"), self.client("events")
        queue_url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        bus = self.outputs.event_bus
        events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps({"source": [publisher.EVENT_SOURCE]}))
        events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn}])
        return queue_url

    def serve(self, model_dir: Path) -> str:
        """Publish and promote an artifact in the stack's model registry; returns its version."""
        assert self.outputs is not None, "start() the stack first"
        registry = ModelRegistry(self.client("s3"), self.outputs.model_bucket)
        registry.publish(model_dir)
        return registry.promote(read_card(model_dir)["version"]).version

    def receive_events(self, queue_url: str, expected: int, timeout_seconds: float) -> list[dict[str, Any]]:
        """The result events a ``subscribe`` queue holds, waiting until ``expected`` distinct results have arrived
        (delivery is at least once) or the timeout passes."""
        sqs = self.client("sqs")
        deadline = time.monotonic() + timeout_seconds
        events: list[dict[str, Any]] = []
        while True:
            events.extend(json.loads(message["Body"]) for message in drain(sqs, queue_url))
            if len({event["detail"]["result_id"] for event in events}) >= expected or time.monotonic() >= deadline:
                return events
            time.sleep(0.2)

    def client(self, service: str) -> Any:
        """A boto3 client for the local endpoint."""
        assert self.outputs is not None, "start() the stack first"
        return boto3.client(service, region_name=self._region, endpoint_url=self.outputs.endpoint_url)  # type: ignore[call-overload]  # The service name is a plain str here.

    def start(self) -> StackOutputs:
        """Start the server, create the resources, and begin feeding the handlers."""
        # The server runs in this process, and the emulator's invocations write at once.
        make_dynamodb_writes_atomic()
        self._server.start()
        host, port = self._server.get_host_and_port()
        endpoint_url = f"http://{host}:{port}"
        # Moto keeps its state per process: a stack started after another in the same process starts empty too.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST"), timeout=10)
        if self._quiet:
            self._quieted = QuietFunctions()
            self._quieted.enter()
        if self.interposer is not None:
            self.interposer.enter()
        # Moto accepts any credentials; clients of this process sign with these unless real ones are set.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")
        os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "pneumoscan")
        # An invocation that records no metric (a batch of backfill requests for images already scored, or metrics
        # disabled on a quiet stack) is normal here; Powertools warns about each one.
        warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)
        template = self._template if self._template is not None else load_template()
        clients: dict[str, Any] = {
            name: boto3.client(name, region_name=self._region, endpoint_url=endpoint_url)
            for name in ("s3", "sqs", "dynamodb", "events", "dynamodbstreams")
        }
        self.outputs = create_data_plane(
            clients["s3"],
            clients["sqs"],
            clients["dynamodb"],
            clients["events"],
            region=self._region,
            endpoint_url=endpoint_url,
            template=template,
            parameters=self._parameters,
        )
        self.emulator = self._attach_scoring(template, clients)
        self.stream_emulator = self._attach_publisher(template, clients)
        self._threads = [
            threading.Thread(target=self.emulator.run, args=(self._stop,), name="sqs-event-source", daemon=True),
            threading.Thread(
                target=self.stream_emulator.run, args=(self._stop,), name="stream-event-source", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        return self.outputs

    def _invoke(self, function: Any) -> Handler:
        """A function module's handler, dropping its metrics after each invocation when the stack is quiet."""
        invoke: Handler = function.lambda_handler
        return QuietFunctions.wrap(invoke, function.metrics) if self._quiet else invoke

    def _interposed(self, function: str, service: str, client: Any) -> Any:
        """The client ``function`` is given: the interposer's, if any."""
        return client if self.interposer is None else self.interposer.client(function, service, client)

    def _attach_scoring(self, template: dict[str, Any], clients: dict[str, Any]) -> SqsEventSourceEmulator:
        """The real scoring handler, wired to this stack's endpoint exactly as the template wires it in AWS (behind
        the interposer's clients, if any), fed by the queue."""
        assert self.outputs is not None
        settings = Settings(
            results_table=self.outputs.results_table,
            input_bucket=self.outputs.input_bucket,
            input_prefix=self.outputs.input_prefix,
            model_bucket=self.outputs.model_bucket,
            model_path=None,
            model_refresh_seconds=5.0,
            model_cache_dir=Path(tempfile.mkdtemp(prefix="pneumoscan-local-models-")),
            max_image_bytes=int(self._parameter(template, "MaxImageBytes")),
            heatmap_bucket=self.outputs.heatmap_bucket,
            heatmaps_for_flagged=heatmap_policy({"HEATMAPS": str(self._parameter(template, "Heatmaps"))}),
            by_day_shards=self.outputs.by_day_shards,
            # The template passes the parameters to the function's environment under these names.
            accepted_ages=accepted_ages(
                {
                    "MIN_PATIENT_AGE_YEARS": str(self._parameter(template, "MinPatientAgeYears")),
                    "MAX_PATIENT_AGE_YEARS": str(self._parameter(template, "MaxPatientAgeYears")),
                }
            ),
        )
        s3 = self._interposed("scoring", "s3", clients["s3"])
        dynamodb = self._interposed("scoring", "dynamodb", clients["dynamodb"])
        handler.pipeline.set(handler.build_pipeline(settings, s3, dynamodb))
        invoke = self._invoke(handler)
        if not self._lambda_process:
            invoke = _one_at_a_time(invoke)
        if self._lambda_process:
            # The interposer's state (a fault plan's generator and counts) changes in the invocation's process; it
            # comes back with it.
            state = self.interposer.shared_state() if self.interposer is not None else None
            self.lambda_process = LambdaProcess(invoke, LambdaLimits.from_template(template), state, _load_model)
            invoke = self.lambda_process
        if self._on_waiting_without_model is not None:
            invoke = self._watch_for_missing_model(invoke, ModelRegistry(clients["s3"], self.outputs.model_bucket))
        if self.interposer is not None:
            invoke = self.interposer.scoring_handler(invoke)
        limits = [reserved_concurrency(template, parameters=self._parameters), self._account_concurrency]
        return SqsEventSourceEmulator(
            clients["sqs"],
            self.outputs.queue_url,
            invoke,
            EventSourceMapping.from_template(template, parameters=self._parameters),
            concurrency_limit=min((limit for limit in limits if limit is not None), default=None),
            retry_delay_seconds=self._retry_delay_seconds,
            duplicate_rate=0.0 if self.interposer is None else self.interposer.duplicate_rate,
            rng=None if self.interposer is None else self.interposer.rng,
            region=self._region,
        )

    def _watch_for_missing_model(self, invoke: Handler, registry: ModelRegistry) -> Handler:
        """The handler, first telling ``on_waiting_without_model`` about a batch that arrives with no model
        promoted."""
        notify = self._on_waiting_without_model
        assert notify is not None

        def run(event: dict[str, Any], context: Any) -> Any:
            waiting = sum(not _is_s3_test_event(record["body"]) for record in event["Records"])
            if waiting:
                try:
                    registry.current()
                except NoCurrentModelError:
                    notify(waiting)
            return invoke(event, context)

        return run

    def _attach_publisher(self, template: dict[str, Any], clients: dict[str, Any]) -> DynamoDbStreamEmulator:
        """The real result publisher (behind the interposer's EventBridge client, if any), fed by the table's
        stream."""
        assert self.outputs is not None
        events = self._interposed("publisher", "events", clients["events"])
        publisher.feed.set(publisher.EventFeed(events, self.outputs.event_bus))
        table = clients["dynamodb"].describe_table(TableName=self.outputs.results_table)["Table"]
        dead_letters = f"{self._parameter(template, 'NamePrefix')}-PublisherDeadLetterQueue"
        return DynamoDbStreamEmulator(
            clients["dynamodbstreams"],
            table["LatestStreamArn"],
            self._invoke(publisher),
            StreamEventSourceMapping.from_template(template),
            sqs=clients["sqs"],
            on_failure_queue_url=clients["sqs"].get_queue_url(QueueName=dead_letters)["QueueUrl"],
            region=self._region,
        )

    def _parameter(self, template: dict[str, Any], name: str) -> Any:
        return {**parameter_defaults(template), **self._parameters}[name]

    def stop(self) -> None:
        """Stop feeding the handlers and shut the server down."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        handler.pipeline.set(None)
        publisher.feed.set(None)
        if self.interposer is not None:
            self.interposer.exit()
        if self._quieted is not None:
            self._quieted.exit()
            self._quieted = None
        self._server.stop()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
