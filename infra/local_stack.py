"""The local stack: template.yaml's data plane on a moto server, an SQS event-source-mapping emulator that feeds
the real scoring handler with Lambda's semantics, and a DynamoDB-stream emulator that feeds the real result
publisher, which puts one event per result on the results bus.

The emulator reads the function's SQS event from the template (batch size, batching window,
``ReportBatchItemFailures``). Like Lambda it receives a batch with the queue's visibility timeout, invokes the
handler, deletes the messages that succeeded, and leaves failed ones to reappear after the visibility timeout;
SQS itself (moto) moves a message to the dead-letter queue once it has been received ``maxReceiveCount`` times.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest.mock import patch

import boto3
import numpy as np
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from core import preprocessing
from core.model_card import read_card
from core.model_registry import ModelRegistry, NoCurrentModelError
from core.preprocessing import DecodedImage
from core.results import plain_item
from infra.corpus import MEMORY_HOG_MARKER, MEMORY_HOG_NAME
from infra.lambda_process import InvocationKilledError, LambdaLimits, LambdaProcess, SharedState
from infra.resources import create_data_plane
from infra.template import load_template, parameter_defaults
from pneumoscan.stack import StackOutputs
from publisher import handler as publisher
from scoring import handler, isolated_decode
from scoring import pipeline as pipeline_module
from scoring.model_provider import ModelUnavailableError
from scoring.settings import Settings, accepted_ages

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


@dataclass(frozen=True)
class EventSourceMapping:
    """The SQS event of the scoring function, as the template declares it."""

    batch_size: int
    batching_window_seconds: float
    report_batch_item_failures: bool

    @classmethod
    def from_template(cls, template: dict[str, Any], function: str = "ScoringFunction") -> EventSourceMapping:
        events = template["Resources"][function]["Properties"]["Events"]
        properties = next(event["Properties"] for event in events.values() if event["Type"] == "SQS")
        return cls(
            batch_size=int(properties.get("BatchSize", 10)),
            batching_window_seconds=float(properties.get("MaximumBatchingWindowInSeconds", 0)),
            report_batch_item_failures="ReportBatchItemFailures" in properties.get("FunctionResponseTypes", []),
        )


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
    ) -> None:
        """``retry_delay_seconds`` makes failed messages visible again sooner than the visibility timeout would
        (soak tests and demos); by default they wait out the visibility timeout, as under Lambda.
        ``duplicate_rate`` re-sends that share of first deliveries as a second message with the same body, as S3's
        at-least-once notifications do."""
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

    def poll_once(self) -> int:
        """Gather one batch (up to the batch size, within the batching window) and deliver it; returns its size."""
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
        if messages:
            self._deliver(messages)
        return len(messages)

    def _deliver(self, messages: list[dict[str, Any]]) -> None:
        self._duplicate_some(messages)
        event = {"Records": [self._record(message) for message in messages]}
        self.stats.invocations += 1
        self.batches.append([message["Body"] for message in messages])
        self._bodies.update((message["MessageId"], message["Body"]) for message in messages)
        try:
            response = self._handler(event, LocalContext(aws_request_id=str(uuid.uuid4())))
        except Exception as crash:  # A crashed invocation, whatever the cause, leaves the whole batch for retry.
            logger.exception("handler crashed; the whole batch of %d becomes visible again", len(messages))
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


@dataclass(frozen=True)
class FaultPlan:
    """Faults injected around the real handler: the soak test's schedule. All rates are per call or message."""

    get_object_failure_rate: float = 0.0
    put_item_throttle_rate: float = 0.0
    put_events_failure_rate: float = 0.0
    """Share of the result publisher's PutEvents calls that fail, so its batches are retried from the stream."""
    duplicate_rate: float = 0.0
    """Share of S3 notifications delivered twice, as separate SQS messages."""
    crash_on_invocation: int | None = None
    """This invocation handles half of its batch, then the handler crashes."""
    decoder_memory_hog: bool = False
    """Decoding a file that carries ``infra.corpus.MEMORY_HOG_MARKER`` allocates memory until its process is killed
    or refused more: a file whose decoding exceeds Lambda's memory in a way the decode budget does not foresee.
    Reads of the hog itself are never failed, so its first delivery always reaches the decoder."""
    seed: int = 0


class FaultInjectingClient:
    """A boto3 client whose named operations fail at the plan's rates (GetObject, PutItem, PutEvents)."""

    def __init__(
        self,
        client: Any,
        failures: dict[str, tuple[float, str]],
        rng: random.Random,
        spare: Callable[[dict[str, Any]], bool] = lambda arguments: False,
    ) -> None:
        """A call whose arguments ``spare`` accepts is never failed."""
        self._client = client
        self._failures = failures
        self._rng = rng
        self._spare = spare
        self._lock = threading.Lock()
        self.injected: dict[str, int] = dict.fromkeys(failures, 0)

    def __getattr__(self, name: str) -> Any:
        operation = getattr(self._client, name)
        if name not in self._failures:
            return operation
        rate, code = self._failures[name]

        def maybe_fail(**arguments: Any) -> Any:
            if self._spare(arguments):
                return operation(**arguments)
            with self._lock:
                fail = self._rng.random() < rate
                if fail:
                    self.injected[name] += 1
            if fail:
                raise ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, name)
            return operation(**arguments)

        return maybe_fail


class MemoryHoggingDecoders:
    """Replaces the scoring pipeline's decoders (in-process and isolated) with ones that exhaust memory on a file
    carrying ``MEMORY_HOG_MARKER``, and puts the real ones back."""

    def __init__(self) -> None:
        self._patches = [
            patch.object(module, "decode", _hogging(preprocessing.decode))
            for module in (pipeline_module, isolated_decode)
        ]

    def enter(self) -> None:
        for replacement in self._patches:
            replacement.start()

    def exit(self) -> None:
        for replacement in self._patches:
            replacement.stop()


def _hogging(decode: Callable[[bytes, int], DecodedImage]) -> Callable[[bytes, int], DecodedImage]:
    def run(data: bytes, size: int) -> DecodedImage:
        if MEMORY_HOG_MARKER in data:
            hog: list[np.ndarray] = []
            while True:  # Every page is written, so it is resident: until the process is killed or refused.
                hog.append(np.ones(32 * 2**20, dtype=np.uint8))
        return decode(data, size)

    return run


class CrashingHandler:
    """Runs the handler normally, except on one invocation: half the batch is handled, then it crashes."""

    def __init__(self, handler: Handler, crash_on_invocation: int) -> None:
        self._handler = handler
        self._crash_on = crash_on_invocation
        self.invocations = 0

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.invocations += 1
        if self.invocations != self._crash_on:
            return self._handler(event, context)
        half = {"Records": event["Records"][: len(event["Records"]) // 2]}
        self._handler(half, context)
        raise RuntimeError(f"injected crash in invocation {self.invocations}, after half of its batch")


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


def _restore_faults(rng: random.Random, clients: tuple[FaultInjectingClient, ...], exported: Any) -> None:
    """Continue the fault plan where an invocation's process left it."""
    rng_state, counts = exported
    rng.setstate(rng_state)
    for client, injected in zip(clients, counts, strict=True):
        client.injected.update(injected)


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
        faults: FaultPlan | None = None,
        quiet: bool = False,
        on_waiting_without_model: Callable[[int], None] | None = None,
        lambda_process: bool = False,
    ) -> None:
        """``quiet`` keeps the handler's per-image logs and metrics off the terminal (demo and soak).
        ``lambda_process`` runs each scoring invocation in a forked child under the function's memory size and
        timeout from the template, killed past either as Lambda kills it (``infra.lambda_process``; the soak).
        ``on_waiting_without_model`` is told, once per delivered batch, how many messages arrived while no model
        is promoted (they fail and wait for a retry, then the dead-letter queue)."""
        self._quiet = quiet
        self._hog = MemoryHoggingDecoders() if faults is not None and faults.decoder_memory_hog else None
        self._lambda_process = lambda_process
        self.lambda_process: LambdaProcess | None = None
        self._on_waiting_without_model = on_waiting_without_model
        self._quieted: QuietFunctions | None = None
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # One line per request would bury everything else.
        self._region = region
        self._retry_delay_seconds = retry_delay_seconds
        self._parameters = parameters or {}
        self.faults = faults or FaultPlan()
        self.fault_clients: list[FaultInjectingClient] = []
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
        self._server.start()
        host, port = self._server.get_host_and_port()
        endpoint_url = f"http://{host}:{port}"
        # Moto keeps its state per process: a stack started after another in the same process starts empty too.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST"), timeout=10)
        if self._quiet:
            self._quieted = QuietFunctions()
            self._quieted.enter()
        if self._hog is not None:
            self._hog.enter()
        # Moto accepts any credentials; clients of this process sign with these unless real ones are set.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")
        os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", "pneumoscan")
        # An invocation that records no metric (a batch of backfill requests for images already scored, or metrics
        # disabled on a quiet stack) is normal here; Powertools warns about each one.
        warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)
        template = load_template()
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
        rng = random.Random(self.faults.seed)
        self.emulator = self._attach_scoring(template, clients, rng)
        self.stream_emulator = self._attach_publisher(template, clients, rng)
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

    def _attach_scoring(
        self, template: dict[str, Any], clients: dict[str, Any], rng: random.Random
    ) -> SqsEventSourceEmulator:
        """The real scoring handler, wired to this stack's endpoint exactly as the template wires it in AWS, behind
        the fault plan's S3 and DynamoDB faults, fed by the queue."""
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
            # The template passes the parameters to the function's environment under these names.
            accepted_ages=accepted_ages(
                {
                    "MIN_PATIENT_AGE_YEARS": str(self._parameter(template, "MinPatientAgeYears")),
                    "MAX_PATIENT_AGE_YEARS": str(self._parameter(template, "MaxPatientAgeYears")),
                }
            ),
        )
        s3 = FaultInjectingClient(
            clients["s3"],
            {"get_object": (self.faults.get_object_failure_rate, "SlowDown")},
            rng,
            # The memory hog's first delivery must reach the decoder, so the soak always has an invocation killed.
            spare=lambda arguments: arguments.get("Key", "").endswith(f"/{MEMORY_HOG_NAME}"),
        )
        dynamodb = FaultInjectingClient(
            clients["dynamodb"],
            {"put_item": (self.faults.put_item_throttle_rate, "ProvisionedThroughputExceededException")},
            rng,
        )
        self.fault_clients.extend([s3, dynamodb])
        handler.pipeline.set(handler.build_pipeline(settings, s3, dynamodb))
        invoke = self._invoke(handler)
        if self._lambda_process:
            # The fault plan's generator and counts change in the invocation's process; they come back with it.
            state = SharedState(
                export=lambda: (rng.getstate(), [dict(client.injected) for client in (s3, dynamodb)]),
                restore=lambda exported: _restore_faults(rng, (s3, dynamodb), exported),
            )
            self.lambda_process = LambdaProcess(invoke, LambdaLimits.from_template(template), state, _load_model)
            invoke = self.lambda_process
        if self._on_waiting_without_model is not None:
            invoke = self._watch_for_missing_model(invoke, ModelRegistry(clients["s3"], self.outputs.model_bucket))
        if self.faults.crash_on_invocation is not None:
            invoke = CrashingHandler(invoke, self.faults.crash_on_invocation)
        return SqsEventSourceEmulator(
            clients["sqs"],
            self.outputs.queue_url,
            invoke,
            EventSourceMapping.from_template(template),
            retry_delay_seconds=self._retry_delay_seconds,
            duplicate_rate=self.faults.duplicate_rate,
            rng=rng,
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

    def _attach_publisher(
        self, template: dict[str, Any], clients: dict[str, Any], rng: random.Random
    ) -> DynamoDbStreamEmulator:
        """The real result publisher behind the fault plan's PutEvents faults, fed by the table's stream."""
        assert self.outputs is not None
        events = FaultInjectingClient(
            clients["events"], {"put_events": (self.faults.put_events_failure_rate, "InternalException")}, rng
        )
        self.fault_clients.append(events)
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
        if self._hog is not None:
            self._hog.exit()
        if self._quieted is not None:
            self._quieted.exit()
            self._quieted = None
        self._server.stop()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
