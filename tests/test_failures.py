"""The fault classes of records reported in batchItemFailures, and the key digests their log lines carry."""

from __future__ import annotations

import hashlib
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from core.events import MalformedMessageError
from core.results import TransientResultsError
from scoring.failures import FaultClass, fault_class, key_digests
from scoring.image_store import TransientStorageError
from scoring.isolated_decode import DecodeTimeoutError
from scoring.model_provider import ModelUnavailableError
from scoring.pipeline import InvocationTimeExhaustedError, ModelVersionMismatchError


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (TransientStorageError("s3"), FaultClass.TRANSIENT_AWS),
        (TransientResultsError("dynamodb"), FaultClass.TRANSIENT_AWS),
        (ClientError({"Error": {"Code": "SlowDown"}}, "GetObject"), FaultClass.TRANSIENT_AWS),
        (EndpointConnectionError(endpoint_url="https://s3"), FaultClass.TRANSIENT_AWS),
        (DecodeTimeoutError("slow"), FaultClass.DECODE_TIMEOUT),
        (InvocationTimeExhaustedError("late"), FaultClass.DECODE_TIMEOUT),
        (ModelUnavailableError("none"), FaultClass.MODEL_UNAVAILABLE),
        (ModelVersionMismatchError("other"), FaultClass.MODEL_UNAVAILABLE),
        (MalformedMessageError("garbage"), FaultClass.MALFORMED_MESSAGE),
        (KeyError("defect"), FaultClass.UNEXPECTED),
    ],
)
def test_each_fault_has_its_class(fault: Exception, expected: FaultClass) -> None:
    """Every fault the pipeline raises for a record maps to one of the fixed classes; anything else is unexpected."""
    assert fault_class(fault) is expected


def test_key_digests_name_the_images_of_a_message_without_their_keys() -> None:
    """A notification's keys become short SHA-256 digests of their s3:// addresses; a body naming no image, or
    one that cannot be read, has none."""
    record = {
        "eventName": "ObjectCreated:Put",
        "s3": {
            "bucket": {"name": "in"},
            "object": {"key": "incoming/a+b.jpeg", "size": 1, "eTag": "e", "sequencer": "1"},
        },
    }
    body = json.dumps({"Records": [record]})
    assert key_digests(body) == [hashlib.sha256(b"s3://in/incoming/a b.jpeg").hexdigest()[:16]]
    assert key_digests(json.dumps({"Event": "s3:TestEvent"})) == []
    assert key_digests("{not json") == []
