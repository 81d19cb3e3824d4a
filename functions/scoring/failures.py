"""Why a record came back in ``batchItemFailures``: a small fixed set of fault classes, for logs and metrics.

Every record the batch processor reports failed gets one log line and one ``RecordsFailed`` metric whose only
dimension is its fault class. The set is fixed, so an alarm can sum its members; no dimension is ever per image.
The log line names the record's images by a digest of their ``s3://`` keys, never by the key itself, and carries no
exception text (a fault's message can quote a key or a service's answer).
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from botocore.exceptions import BotoCoreError, ClientError

from core.events import MalformedMessageError, parse_message
from core.results import TransientResultsError
from scoring.image_store import TransientStorageError
from scoring.isolated_decode import DecodeTimeoutError
from scoring.model_provider import ModelUnavailableError
from scoring.pipeline import InvocationTimeExhaustedError, ModelVersionMismatchError

KEY_DIGEST_LENGTH = 16
"""Hexadecimal characters of a key's SHA-256 kept in a log line: enough to match a known key, not to read one."""


class FaultClass(StrEnum):
    """Why a record failed and will be delivered again (or, after the queue's receives, dead-lettered)."""

    TRANSIENT_AWS = "transient_aws"
    """S3 or DynamoDB refused or failed a call (throttling, 5xx, network, permissions)."""
    DECODE_TIMEOUT = "decode_timeout"
    """An isolated decode ran past its time, or the invocation had none left for it."""
    MODEL_UNAVAILABLE = "model_unavailable"
    """No model could be loaded, or a backfill asks for a model the function does not serve yet."""
    MALFORMED_MESSAGE = "malformed_message"
    """The message body is neither an S3 notification, S3's test event nor a backfill request."""
    UNEXPECTED = "unexpected"
    """Anything else: a defect to investigate."""


def fault_class(fault: BaseException) -> FaultClass:
    """The class of a record's fault."""
    if isinstance(fault, TransientStorageError | TransientResultsError | ClientError | BotoCoreError):
        return FaultClass.TRANSIENT_AWS
    if isinstance(fault, DecodeTimeoutError | InvocationTimeExhaustedError):
        return FaultClass.DECODE_TIMEOUT
    if isinstance(fault, ModelUnavailableError | ModelVersionMismatchError):
        return FaultClass.MODEL_UNAVAILABLE
    if isinstance(fault, MalformedMessageError):
        return FaultClass.MALFORMED_MESSAGE
    return FaultClass.UNEXPECTED


def key_digest(image_key: str) -> str:
    """A short SHA-256 of an ``s3://bucket/key`` address: ``printf %s s3://bucket/key | sha256sum`` finds it."""
    return hashlib.sha256(image_key.encode()).hexdigest()[:KEY_DIGEST_LENGTH]


def key_digests(body: str) -> list[str]:
    """The digests of the images one message body names; none for a body that names none or cannot be read."""
    try:
        return [key_digest(ref.image_key) for ref in parse_message(body).refs]
    except MalformedMessageError:
        return []
