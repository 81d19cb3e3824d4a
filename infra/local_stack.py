"""The local stack: template.yaml's data plane on a moto server, and an SQS event-source-mapping emulator that feeds
the real scoring handler with Lambda's semantics.

The emulator reads the function's SQS event from the template (batch size, batching window,
``ReportBatchItemFailures``). Like Lambda it receives a batch with the queue's visibility timeout, invokes the
handler, deletes the messages that succeeded, and leaves failed ones to reappear after the visibility timeout;
SQS itself (moto) moves a message to the dead-letter queue once it has been received ``maxReceiveCount`` times.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from infra.resources import StackOutputs, create_data_plane
from infra.template import load_template

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Any], Any]


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


@dataclass
class DeliveryStats:
    """What the emulator has done so far."""

    invocations: int = 0
    messages_received: int = 0
    messages_deleted: int = 0
    messages_failed: int = 0
    handler_crashes: int = 0


class SqsEventSourceEmulator:
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
        region: str = "us-east-1",
    ) -> None:
        """``retry_delay_seconds`` makes failed messages visible again sooner than the visibility timeout would
        (soak tests and demos); by default they wait out the visibility timeout, as under Lambda."""
        self._sqs = sqs
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

    def poll_once(self) -> int:
        """Gather one batch (up to the batch size, within the batching window) and deliver it; returns its size."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + self._mapping.batching_window_seconds
        while len(messages) < self._mapping.batch_size:
            arguments: dict[str, Any] = {
                "QueueUrl": self._queue_url,
                "MaxNumberOfMessages": min(10, self._mapping.batch_size - len(messages)),
                "AttributeNames": ["All"],
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
        event = {"Records": [self._record(message) for message in messages]}
        self.stats.invocations += 1
        self.stats.messages_received += len(messages)
        try:
            response = self._handler(event, LocalContext(aws_request_id=str(uuid.uuid4())))
        except Exception:  # A crashed invocation, whatever the cause, leaves the whole batch for retry.
            logger.exception("handler crashed; the whole batch of %d becomes visible again", len(messages))
            self.stats.handler_crashes += 1
            self.stats.messages_failed += len(messages)
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
        self._schedule_retry([message for message in messages if message["MessageId"] in failed])

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

    def run(self, stop: threading.Event, idle_sleep: float = 0.1) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            if self.poll_once() == 0:
                stop.wait(idle_sleep)


class LocalStack:
    """A moto server with the template's resources and the scoring handler attached to the queue."""

    def __init__(self, port: int = 0, region: str = "us-east-1", retry_delay_seconds: int | None = None) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._region = region
        self._retry_delay_seconds = retry_delay_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.outputs: StackOutputs | None = None
        self.emulator: SqsEventSourceEmulator | None = None

    def client(self, service: str) -> Any:
        """A boto3 client for the local endpoint."""
        assert self.outputs is not None, "start() the stack first"
        return boto3.client(service, region_name=self._region, endpoint_url=self.outputs.endpoint_url)  # type: ignore[call-overload]  # The service name is a plain str here.

    def start(self) -> StackOutputs:
        """Start the server, create the resources, and begin feeding the handler."""
        self._server.start()
        host, port = self._server.get_host_and_port()
        endpoint_url = f"http://{host}:{port}"
        # Credentials and endpoint for every boto3 client of this process, the handler's included.
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "local"),
            ("AWS_SECRET_ACCESS_KEY", "local"),
            ("AWS_DEFAULT_REGION", self._region),
            ("AWS_ENDPOINT_URL", endpoint_url),
            ("POWERTOOLS_TRACE_DISABLED", "1"),
            ("POWERTOOLS_METRICS_NAMESPACE", "pneumoscan"),
        ):
            os.environ[name] = value
        template = load_template()
        clients = {
            name: boto3.client(name, region_name=self._region, endpoint_url=endpoint_url)
            for name in ("s3", "sqs", "dynamodb")
        }
        self.outputs = create_data_plane(
            clients["s3"],
            clients["sqs"],
            clients["dynamodb"],
            region=self._region,
            endpoint_url=endpoint_url,
            template=template,
        )
        os.environ["RESULTS_TABLE"] = self.outputs.results_table
        os.environ["MODEL_BUCKET"] = self.outputs.model_bucket
        os.environ.setdefault("MODEL_REFRESH_SECONDS", "5")
        from scoring import handler  # noqa: PLC0415  # Imported once the environment above is in place.

        self.emulator = SqsEventSourceEmulator(
            clients["sqs"],
            self.outputs.queue_url,
            handler.lambda_handler,
            EventSourceMapping.from_template(template),
            retry_delay_seconds=self._retry_delay_seconds,
            region=self._region,
        )
        self._thread = threading.Thread(
            target=self.emulator.run, args=(self._stop,), name="sqs-event-source", daemon=True
        )
        self._thread.start()
        return self.outputs

    def stop(self) -> None:
        """Stop feeding the handler and shut the server down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._server.stop()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
