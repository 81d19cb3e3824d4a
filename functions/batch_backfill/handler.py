"""Backfill driven by S3 Batch Operations, for objects too many to list: an S3 Inventory manifest names them, and a
Batch Operations job's "Invoke AWS Lambda function" operation calls this function for each one. It sends the same
backfill request as ``pneumoscan backfill``, so the scoring function does the rest, and answers each task so that
Batch Operations retries what failed for now and reports the rest in its completion report.

The job passes the model that must score the objects as the user argument ``model_version`` (invocation schema
2.0), and optionally ``explain`` ("true" for a heatmap of every film).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import (
    S3BatchOperationEvent,
    S3BatchOperationResponse,
    S3BatchOperationResponseRecord,
    event_source,
)
from aws_lambda_powertools.utilities.data_classes.s3_batch_operation_event import S3BatchOperationTask
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from core.config import ConfigurationError
from core.events import BackfillRequest
from core.provider import Provider
from core.s3 import is_gone

logger = Logger(service="pneumoscan-batch-backfill")


class PermanentTaskError(RuntimeError):
    """This object can never be enqueued (outside the input prefix, gone): reported, not retried."""


class TemporaryTaskError(RuntimeError):
    """S3 or SQS could not answer now: Batch Operations retries the task."""


@dataclass(frozen=True)
class BatchBackfillSettings:
    """Where backfill requests go, and which objects the scoring function may read."""

    scoring_queue_url: str
    input_bucket: str
    input_prefix: str

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] = os.environ) -> BatchBackfillSettings:
        try:
            return cls(environment["SCORING_QUEUE_URL"], environment["INPUT_BUCKET"], environment["INPUT_PREFIX"])
        except KeyError as missing:
            raise ConfigurationError(f"environment variable {missing} is required") from missing


class BackfillEnqueuer:
    """HEADs one object for its ETag and size and sends its backfill request to the scoring queue."""

    def __init__(self, s3_client: Any, sqs_client: Any, settings: BatchBackfillSettings) -> None:
        self._s3 = s3_client
        self._sqs = sqs_client
        self._settings = settings

    def enqueue(self, bucket: str, key: str, version_id: str | None, model_version: str, explain: bool) -> str:
        """Send the object's backfill request; returns the SQS message id."""
        if bucket != self._settings.input_bucket or not key.startswith(self._settings.input_prefix):
            raise PermanentTaskError(
                f"s3://{bucket}/{key} is outside s3://{self._settings.input_bucket}/{self._settings.input_prefix}"
            )
        address = {"Bucket": bucket, "Key": key, **({"VersionId": version_id} if version_id else {})}
        try:
            head = self._s3.head_object(**address)
        except ClientError as error:
            if is_gone(error):
                raise PermanentTaskError(f"s3://{bucket}/{key} no longer exists") from error
            raise TemporaryTaskError(f"cannot read s3://{bucket}/{key}: {error}") from error
        except BotoCoreError as error:
            raise TemporaryTaskError(f"cannot read s3://{bucket}/{key}: {error}") from error
        request = BackfillRequest(
            bucket=bucket,
            key=key,
            etag=str(head["ETag"]).strip('"'),
            size=int(head["ContentLength"]),
            model_version=model_version,
            explain=explain,
        )
        try:
            message_id: str = self._sqs.send_message(
                QueueUrl=self._settings.scoring_queue_url, MessageBody=request.to_json()
            )["MessageId"]
        except (ClientError, BotoCoreError) as error:
            raise TemporaryTaskError(f"the scoring queue refused s3://{bucket}/{key}: {error}") from error
        return message_id


def task_result(
    task: S3BatchOperationTask, enqueuer: BackfillEnqueuer, user_arguments: Mapping[str, Any]
) -> S3BatchOperationResponseRecord:
    """One task's answer: Succeeded, PermanentFailure (reported) or TemporaryFailure (retried)."""
    model_version = str(user_arguments.get("model_version") or "")
    if not model_version:
        return task.build_task_batch_response("PermanentFailure", "the job's user argument model_version is required")
    explain = str(user_arguments.get("explain", "false")).lower() in {"1", "true", "yes"}
    try:
        message_id = enqueuer.enqueue(task.s3_bucket, task.s3_key, task.s3_version_id, model_version, explain)
    except PermanentTaskError as error:
        return task.build_task_batch_response("PermanentFailure", str(error))
    except TemporaryTaskError as error:
        return task.build_task_batch_response("TemporaryFailure", str(error))
    return task.build_task_batch_response("Succeeded", f"enqueued as {message_id}")


enqueuer = Provider(
    lambda: BackfillEnqueuer(boto3.client("s3"), boto3.client("sqs"), BatchBackfillSettings.from_environment())
)
"""The enqueuer of this execution environment; tests wire their own clients."""


@logger.inject_lambda_context
@event_source(data_class=S3BatchOperationEvent)
def lambda_handler(event: S3BatchOperationEvent, context: LambdaContext) -> dict[str, Any]:
    response = S3BatchOperationResponse(event.invocation_schema_version, event.invocation_id, "PermanentFailure")
    user_arguments = event.job.user_arguments or {}
    for task in event.tasks:
        result = task_result(task, enqueuer.get(), user_arguments)
        logger.info("batch task", extra={"key": task.s3_key, "result": result.result_code})
        response.add_result(result)
    return response.asdict()
