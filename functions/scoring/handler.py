"""The scoring Lambda: SQS batches of S3 ObjectCreated notifications -> results table.

Clients, Logger, Metrics, Tracer and the pipeline are built once per execution environment; the handler is a few
lines around Powertools' batch processor, which turns each record's raised fault into a ``batchItemFailures``
entry so SQS retries only that record (and moves it to the DLQ after ``maxReceiveCount``), and reports each such
record with one log line and one ``RecordsFailed`` metric by fault class (``scoring.failures``).
"""

from __future__ import annotations

from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.batch import EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from core.batch import ReportingBatchProcessor
from core.labels import Label
from core.model_registry import ModelRegistry
from core.provider import Provider
from core.results import ResultsTable, ScoringResult
from scoring.failures import FaultClass, fault_class, key_digests
from scoring.heatmaps import HeatmapStage, HeatmapStore
from scoring.image_store import ImageStore
from scoring.isolated_decode import IsolationLimits
from scoring.model_provider import ModelProvider, ModelRefusal
from scoring.pipeline import ScoringPipeline, receive_count
from scoring.settings import Settings

NAMESPACE = "pneumoscan"
PNEUMONIA = Label.PNEUMONIA

# Every log line is ingested and billed per byte: no code location, no X-Ray trace id (tracing is off unless the
# Tracing parameter turns it on), and of Lambda's context only the request id (see CONTEXT_KEYS_NOT_LOGGED).
logger = Logger(service="pneumoscan-scoring", location=None, xray_trace_id=None)
CONTEXT_KEYS_NOT_LOGGED = ("cold_start", "function_name", "function_memory_size", "function_arn")
"""What the log group, its stream and Lambda's REPORT line already say about every invocation."""
tracer = Tracer(service="pneumoscan-scoring")
metrics = Metrics(namespace=NAMESPACE, service="pneumoscan-scoring")


class PowertoolsObserver:
    """Reports results as metrics and structured logs: keys, sizes and verdicts, never image content."""

    def scored(self, result: ScoringResult) -> None:
        metrics.add_metric(name="ImagesScored", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="ScoringLatency", unit=MetricUnit.Milliseconds, value=result.latency_ms)
        # Drift signals, per model version: the averages of PneumoniaDetected and Indeterminate are the shares of
        # films called PNEUMONIA and INDETERMINATE, and the average of PneumoniaProbability the mean probability.
        metrics.add_metric(
            name="PneumoniaProbability", unit=MetricUnit.NoUnit, value=result.pneumonia_probability or 0.0
        )
        metrics.add_metric(name="PneumoniaDetected", unit=MetricUnit.Count, value=1 if result.label == PNEUMONIA else 0)
        metrics.add_metric(
            name="Indeterminate", unit=MetricUnit.Count, value=1 if result.label == Label.INDETERMINATE else 0
        )
        if result.heatmap_key:
            metrics.add_metric(name="HeatmapsStored", unit=MetricUnit.Count, value=1)
        # The verdict at INFO (about 400 bytes a film); the model version and latency are in the invocation's
        # metrics record and, with the heatmap's address, in the results table, so they are logged at DEBUG only.
        logger.info(
            "image scored",
            extra={
                "image_key": result.image_key,
                "label": result.label,
                "pneumonia_probability": result.pneumonia_probability,
                "trigger": result.trigger,
            },
        )
        logger.debug(
            "image scored: detail",
            extra={
                "image_key": result.image_key,
                "model_version": result.model_version,
                "latency_ms": result.latency_ms,
                "heatmap_key": result.heatmap_key,
            },
        )

    def rejected(self, result: ScoringResult) -> None:
        metrics.add_metric(name="ImagesRejected", unit=MetricUnit.Count, value=1)
        with single_metric(
            name="ImagesRejectedByReason", unit=MetricUnit.Count, value=1, namespace=NAMESPACE
        ) as metric:
            metric.add_dimension(name="reason", value=result.reason or "unknown")
        logger.warning(
            "image rejected",
            extra={"image_key": result.image_key, "reason": result.reason, "detail": result.reason_detail},
        )

    def heatmap_failed(self, image_key: str, why: str) -> None:
        metrics.add_metric(name="HeatmapsFailed", unit=MetricUnit.Count, value=1)
        logger.warning(
            "heatmap not made; the verdict is written without it", extra={"image_key": image_key, "why": why}
        )

    def skipped(self, image_key: str, sequence: str, why: str) -> None:
        metrics.add_metric(name="NotificationsSkipped", unit=MetricUnit.Count, value=1)
        logger.info("notification skipped", extra={"image_key": image_key, "object_sequence": sequence, "why": why})

    def dropped(self, why: str) -> None:
        metrics.add_metric(name="RecordsDropped", unit=MetricUnit.Count, value=1)
        logger.warning("record dropped: it can never be scored", extra={"why": why})

    def model_refused(self, refusal: ModelRefusal) -> None:
        metrics.add_metric(name="ModelRefused", unit=MetricUnit.Count, value=1)
        logger.error(
            refusal.message,
            extra={
                "refused_version": refusal.refused_version,
                "serving_version": refusal.serving_version,
                "detail": refusal.detail,
            },
        )


def report_failure(record: SQSRecord | None, fault: BaseException) -> None:
    """One log line and one ``RecordsFailed`` metric (dimension: fault class) for a record reported in
    ``batchItemFailures``: its message id, the digests of the keys it names and its fault's class and type, never the
    fault's text."""
    kind = fault_class(fault)
    with single_metric(name="RecordsFailed", unit=MetricUnit.Count, value=1, namespace=NAMESPACE) as metric:
        metric.add_dimension(name="fault_class", value=kind.value)
    fields: dict[str, object] = {"fault_class": kind.value, "fault_type": type(fault).__name__}
    if record is not None:
        fields |= {
            "message_id": record.message_id,
            "receive_count": receive_count(record),
            "key_sha256": key_digests(record.body),
        }
    # What SQS will retry on its own is a warning; a missing model or a defect needs someone.
    level = logger.warning if kind in {FaultClass.TRANSIENT_AWS, FaultClass.DECODE_TIMEOUT} else logger.error
    level("record failed; SQS delivers it again until the queue's maxReceiveCount", extra=fields)


# A batch whose every record failed is still a partial response naming each one, not an exception.
processor = ReportingBatchProcessor(EventType.SQS, report_failure, raise_on_entire_batch_failure=False)


def build_pipeline(
    settings: Settings, s3_client: Any = None, dynamodb_client: Any = None, isolation: IsolationLimits | None = None
) -> ScoringPipeline:
    """Wire the adapters; clients and the isolated decode's limits can be injected (tests, local stack)."""
    s3 = s3_client or boto3.client("s3")
    dynamodb = dynamodb_client or boto3.client("dynamodb")
    registry = ModelRegistry(s3, settings.model_bucket) if settings.model_bucket else None
    observer = PowertoolsObserver()
    models = ModelProvider(
        registry,
        cache_dir=settings.model_cache_dir,
        refresh_seconds=settings.model_refresh_seconds,
        local_model=settings.model_path,
        on_refused=observer.model_refused,
    )
    return ScoringPipeline(
        images=ImageStore(s3),
        results=ResultsTable(dynamodb, settings.results_table, settings.by_day_shards),
        models=models,
        observer=observer,
        max_image_bytes=settings.max_image_bytes,
        input_bucket=settings.input_bucket,
        input_prefix=settings.input_prefix,
        heatmaps=HeatmapStage(
            HeatmapStore(s3, settings.heatmap_bucket),
            observer,
            settings.io_concurrency,
            flagged=settings.heatmaps_for_flagged,
        )
        if settings.heatmap_bucket
        else None,
        isolation=isolation,
        accepted_ages=settings.accepted_ages,
        io_concurrency=settings.io_concurrency,
    )


pipeline = Provider(lambda: build_pipeline(Settings.from_environment()))
"""The pipeline of this execution environment; the local stack and tests wire their own clients."""


@logger.inject_lambda_context(correlation_id_path="Records[0].messageId")
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    logger.remove_keys(CONTEXT_KEYS_NOT_LOGGED)
    scoring = pipeline.get()
    plans = scoring.prepare(
        [SQSRecord(record) for record in event.get("Records", [])],
        remaining_seconds=lambda: context.get_remaining_time_in_millis() / 1000,
    )
    # Every result is written before the batch processor walks the records: the writes run concurrently, and each
    # record's commit reports its own writes or raises its fault.
    scoring.write(plans.values())
    if any(plan.results for plan in plans.values()):
        # Every metric of the invocation is broken down by the model that served it. (Only when there will be
        # metrics: Powertools keeps the dimensions of an invocation that flushed none.)
        metrics.add_dimension(name="model_version", value=scoring.model_version or "none")
    return process_partial_response(
        event=event,
        record_handler=lambda record: scoring.commit(plans[record.message_id]),
        processor=processor,
        context=context,
    )
